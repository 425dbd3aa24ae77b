//! SIGTERM and SIGINT as an orderly stop: blocked in every thread and taken by one
//! thread with sigwait, which calls the caller's handler.

use anyhow::bail;

/// Blocks SIGTERM/SIGINT in this thread (threads started later inherit the mask; call
/// it before starting any) and calls `on_signal` with each one that arrives.
pub fn on_termination(on_signal: impl Fn(i32) + Send + 'static) -> anyhow::Result<()> {
    // SAFETY: sigset manipulation on a local set, then pthread_sigmask for this thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("cannot block SIGTERM/SIGINT");
        }
        set
    };
    std::thread::spawn(move || {
        loop {
            let mut sig = 0;
            // SAFETY: sigwait on a valid, initialised set; writes the signal number.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            on_signal(sig);
        }
    });
    Ok(())
}
