.intel_syntax noprefix
.code64
# Touches PAGES pages of guest memory from 16 MiB up (one non-zero quadword each, so
# every page holds data), says so on the debug port (0x510, value 1), then halts
# (interrupts off: the vCPU sleeps in KVM, costing the host nothing).
# The page count is the immediate 0x7fff0001, which the benchmark patches.
start:
    mov rdi, 0x1000000
    mov ecx, 0x7fff0001
1:  mov [rdi], rdi
    add rdi, 4096
    dec ecx
    jnz 1b
    mov dx, 0x510
    mov al, 1
    out dx, al
    cli
2:  hlt
    jmp 2b
