.intel_syntax noprefix
.code64
# Loaded at 0x100000, entered in long mode with the boot GDT (CS 0x08) and
# the identity map of the first 4 GiB.
start:
    mov rdi, 0x300000          # 64 pages, each starting with index ^ 0x5a5a5a5a
    xor ecx, ecx
1:  mov rax, rcx
    xor rax, 0x5a5a5a5a
    mov [rdi], rax
    add rdi, 4096
    inc ecx
    cmp ecx, 64
    jne 1b
    lea rax, [rip + tick]      # IDT entry for vector 0x40 at 0x2000 + 0x400
    mov rdi, 0x2400
    mov [rdi], ax
    mov word ptr [rdi + 2], 0x08
    mov word ptr [rdi + 4], 0x8e00
    shr rax, 16
    mov [rdi + 6], ax
    shr rax, 16
    mov [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
    sub rsp, 16
    mov word ptr [rsp], 0x40f
    mov qword ptr [rsp + 2], 0x2000
    lidt [rsp]
    add rsp, 16
    mov rbx, 0xfee00000        # local APIC: on, timer periodic at vector 0x40
    mov dword ptr [rbx + 0xf0], 0x1ff
    mov dword ptr [rbx + 0x3e0], 0xb
    mov dword ptr [rbx + 0x320], 0x20040
    mov dword ptr [rbx + 0x380], 0x200000
    sti
    xor r15, r15
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [0x200010], rax
loop:
    inc r15                    # a counter only the registers hold ...
    mov [0x200020], r15        # ... mirrored to memory
    inc qword ptr [0x200000]   # a counter in memory
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, [0x200010]
    jae 2f
    inc qword ptr [0x200018]   # the TSC went backwards
2:  mov [0x200010], rax
    out 0x80, al               # an exit every round: snapshots land on pending I/O
    jmp loop
tick:
    push rbx
    inc qword ptr [0x200008]   # timer interrupts taken
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0xb0], 0
    pop rbx
    iretq
