//! The process tree of a run: preparing the command (own process group, death signal),
//! signalling the whole tree, reaping what it left behind, and killing what a killed
//! singleflight left behind. Linux finds escapees (setsid, double fork) as a child
//! subreaper and by a token in their environment; other Unixes have the process group;
//! Windows has a Job Object that kills the tree when it is closed.

use std::io;
use std::process::{Child, Command};

/// Set in the environment of every process of a run, to find its tree later.
pub const RUN_ID_ENV: &str = "SINGLEFLIGHT_RUN_ID";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: please stop.
    Term,
    /// SIGKILL.
    Kill,
}

/// The process tree of one run, from its spawn until it is gone: the command's process
/// group on Unix, its Job Object on Windows.
pub struct Tree {
    /// The command's pid, which is also its process group id.
    pid: u32,
    #[cfg(windows)]
    job: windows::Job,
}

impl Tree {
    /// Takes charge of the tree of a command spawned after [`prepare`]. On Windows the
    /// command was created suspended: it is put in a Job Object that kills everything
    /// in it when closed (so the tree dies with singleflight, however singleflight
    /// dies) and only then let go, so nothing it starts can be outside the job. If that
    /// fails, the command is killed before it ran a single instruction.
    pub fn adopt(child: &mut Child) -> io::Result<Tree> {
        #[cfg(windows)]
        {
            let adopted = windows::Job::new().and_then(|job| {
                job.assign(child)?;
                windows::resume(child.id())?;
                Ok(job)
            });
            match adopted {
                Ok(job) => Ok(Tree {
                    pid: child.id(),
                    job,
                }),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    Err(e)
                }
            }
        }
        #[cfg(not(windows))]
        Ok(Tree { pid: child.id() })
    }

    /// The command's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Asks the whole tree to stop ([`Stop::Term`]) or kills it ([`Stop::Kill`]). On
    /// Windows the ask is a CTRL_BREAK to the command's console process group; a tree
    /// that cannot get one (no console) is killed at once.
    pub fn signal(&self, stop: Stop) {
        #[cfg(windows)]
        if stop == Stop::Kill || !windows::ctrl_break(self.pid) {
            self.job.terminate();
        }
        #[cfg(not(windows))]
        signal_tree(self.pid, stop);
    }

    /// After the command itself has exited: kills whatever is left of its tree and
    /// waits until it is gone.
    pub fn kill_leftovers(self) {
        #[cfg(windows)]
        {
            self.job.terminate();
            self.job.wait_until_empty();
        }
        #[cfg(not(windows))]
        kill_leftovers(self.pid);
    }
}

/// Makes orphaned descendants of this process its children (Linux), so that escapees
/// can be found and reaped. Call once before the first spawn.
pub fn become_subreaper() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let me = rustix::process::getpid();
        let _ = rustix::process::set_child_subreaper(Some(me));
    }
}

/// Puts the command in its own process group and, on Linux, has the kernel kill it
/// if singleflight dies (SIGKILL included). The command must be spawned from the
/// thread that lives as long as the run: the death signal fires when that thread ends.
/// On Windows it is created suspended in a new console process group, for
/// [`Tree::adopt`].
pub fn prepare(command: &mut Command, token: &str) {
    command.env(RUN_ID_ENV, token);
    #[cfg(windows)]
    std::os::windows::process::CommandExt::creation_flags(command, windows::RUN_FLAGS);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let parent = rustix::process::getpid();
            // SAFETY: only async-signal-safe syscalls between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    use rustix::process::{Signal, getppid, set_parent_process_death_signal};
                    set_parent_process_death_signal(Some(Signal::KILL))?;
                    // singleflight may have died before the death signal was armed.
                    if getppid() != Some(parent) {
                        return Err(std::io::Error::other("singleflight exited"));
                    }
                    Ok(())
                });
            }
        }
    }
}

/// Signals the run's process group and, on Linux, every descendant of singleflight
/// (which includes the ones that left the group).
pub fn signal_tree(group: u32, stop: Stop) {
    #[cfg(unix)]
    {
        use rustix::process::{Pid, Signal, kill_process_group};
        let signal = match stop {
            Stop::Term => Signal::TERM,
            Stop::Kill => Signal::KILL,
        };
        if let Some(pid) = Pid::from_raw(group as i32) {
            let _ = kill_process_group(pid, signal);
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        for pid in linux::descendants(std::process::id()) {
            linux::kill(pid, signal);
        }
    }
    #[cfg(not(unix))]
    let _ = (group, stop);
}

/// After the command itself has exited and been reaped: kills whatever is left of
/// its tree and reaps it, so that the run never outlives a process it started.
pub fn kill_leftovers(group: u32) {
    signal_tree(group, Stop::Kill);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    linux::reap_descendants(group);
}

/// Kills what a run whose singleflight was killed left behind: the processes that
/// carry its token, and the members of its process group if the group is still its
/// own (pid and start time checked, so that a reused pid is never hit).
pub fn kill_remains(record: &crate::record::RunRecord) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    linux::kill_remains(record);
    #[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
    if let Some(pid) = rustix::process::Pid::from_raw(record.pid as i32) {
        // Without /proc there is no start time to check. A live process with the
        // recorded pid may be a stranger that reused it: it is left alone (and with
        // it, there being no death signal here, the run's own leader). A pid that is
        // gone cannot have been handed out again while its group lives on, so a group
        // with that id is still the run's.
        use rustix::process::{Signal, kill_process_group, test_kill_process};
        if test_kill_process(pid).is_err_and(|e| e == rustix::io::Errno::SRCH) {
            let _ = kill_process_group(pid, Signal::KILL);
        }
    }
    #[cfg(not(unix))]
    let _ = record;
}

/// The kernel's boot id, to tell records of an earlier boot apart.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

/// The start time of `pid` in clock ticks since boot, 0 if unknown.
pub fn start_ticks(pid: u32) -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(stat) = linux::Stat::read(pid) {
        return stat.start_ticks;
    }
    let _ = pid;
    0
}

#[cfg(windows)]
pub(crate) mod windows {
    //! Job Objects and console control events, the Windows side of a run's tree.

    use std::ffi::c_void;
    use std::io;
    use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
    use std::process::Child;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use windows_sys::Win32::Foundation::{FALSE, HANDLE, INVALID_HANDLE_VALUE, TRUE};
    use windows_sys::Win32::System::Console::{
        CTRL_BREAK_EVENT, CTRL_C_EVENT, GenerateConsoleCtrlEvent, SetConsoleCtrlHandler,
    };
    use windows_sys::Win32::System::Diagnostics::ToolHelp::{
        CreateToolhelp32Snapshot, TH32CS_SNAPTHREAD, THREADENTRY32, Thread32First, Thread32Next,
    };
    use windows_sys::Win32::System::JobObjects::{
        AssignProcessToJobObject, CreateJobObjectW, JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
        JOBOBJECT_BASIC_ACCOUNTING_INFORMATION, JOBOBJECT_EXTENDED_LIMIT_INFORMATION,
        JobObjectBasicAccountingInformation, JobObjectExtendedLimitInformation,
        QueryInformationJobObject, SetInformationJobObject, TerminateJobObject,
    };
    use windows_sys::Win32::System::Threading::{
        CREATE_NEW_PROCESS_GROUP, CREATE_SUSPENDED, OpenThread, ResumeThread, THREAD_SUSPEND_RESUME,
    };

    /// A run's command: suspended until it is in its job, and the root of a console
    /// process group, so that CTRL_BREAK reaches its tree and not singleflight.
    pub const RUN_FLAGS: u32 = CREATE_SUSPENDED | CREATE_NEW_PROCESS_GROUP;
    /// The exit code of processes killed with the job (the run counts as timed out or
    /// interrupted, whatever this is).
    const KILLED: u32 = 1;
    /// How long a terminated job may take to empty before singleflight goes on.
    const EMPTY_PATIENCE: Duration = Duration::from_secs(10);

    fn check(ok: i32) -> io::Result<()> {
        if ok == 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// A Job Object that kills all its processes when its last handle is closed. The
    /// handle is not inheritable, so the tree cannot keep its own job alive.
    pub struct Job(OwnedHandle);

    impl Job {
        pub fn new() -> io::Result<Job> {
            // SAFETY: plain Win32 calls; the handle is owned from here on.
            unsafe {
                let handle = CreateJobObjectW(std::ptr::null(), std::ptr::null());
                if handle.is_null() {
                    return Err(io::Error::last_os_error());
                }
                let job = Job(OwnedHandle::from_raw_handle(handle));
                let mut limits: JOBOBJECT_EXTENDED_LIMIT_INFORMATION = std::mem::zeroed();
                limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
                check(SetInformationJobObject(
                    job.raw(),
                    JobObjectExtendedLimitInformation,
                    (&raw const limits).cast::<c_void>(),
                    size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32,
                ))?;
                Ok(job)
            }
        }

        fn raw(&self) -> HANDLE {
            self.0.as_raw_handle()
        }

        pub fn assign(&self, child: &Child) -> io::Result<()> {
            // SAFETY: both handles are open for the duration of the call.
            check(unsafe { AssignProcessToJobObject(self.raw(), child.as_raw_handle()) })
        }

        pub fn terminate(&self) {
            // SAFETY: the job handle is open.
            unsafe { TerminateJobObject(self.raw(), KILLED) };
        }

        /// How many processes of the job are alive; `None` if the job cannot say.
        fn active_processes(&self) -> Option<u32> {
            // SAFETY: the out buffer is a properly sized, writable struct.
            unsafe {
                let mut info: JOBOBJECT_BASIC_ACCOUNTING_INFORMATION = std::mem::zeroed();
                let ok = QueryInformationJobObject(
                    self.raw(),
                    JobObjectBasicAccountingInformation,
                    (&raw mut info).cast::<c_void>(),
                    size_of::<JOBOBJECT_BASIC_ACCOUNTING_INFORMATION>() as u32,
                    std::ptr::null_mut(),
                );
                (ok != 0).then_some(info.ActiveProcesses)
            }
        }

        /// Waits (bounded) until every process of a terminated job is gone.
        pub fn wait_until_empty(&self) {
            let deadline = Instant::now() + EMPTY_PATIENCE;
            while self.active_processes().is_some_and(|n| n > 0) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// Resumes the threads of a process created suspended (there is one: the main
    /// thread). std hands out no thread handle, so they are found by a snapshot.
    pub fn resume(pid: u32) -> io::Result<()> {
        // SAFETY: plain Win32 calls on handles owned here.
        unsafe {
            let snapshot = CreateToolhelp32Snapshot(TH32CS_SNAPTHREAD, 0);
            if snapshot == INVALID_HANDLE_VALUE {
                return Err(io::Error::last_os_error());
            }
            let snapshot = OwnedHandle::from_raw_handle(snapshot);
            let mut entry: THREADENTRY32 = std::mem::zeroed();
            entry.dwSize = size_of::<THREADENTRY32>() as u32;
            let mut more = Thread32First(snapshot.as_raw_handle(), &mut entry);
            let mut resumed = 0;
            while more != 0 {
                if entry.th32OwnerProcessID == pid {
                    let thread = OpenThread(THREAD_SUSPEND_RESUME, FALSE, entry.th32ThreadID);
                    if thread.is_null() {
                        return Err(io::Error::last_os_error());
                    }
                    let thread = OwnedHandle::from_raw_handle(thread);
                    if ResumeThread(thread.as_raw_handle()) == u32::MAX {
                        return Err(io::Error::last_os_error());
                    }
                    resumed += 1;
                }
                more = Thread32Next(snapshot.as_raw_handle(), &mut entry);
            }
            if resumed == 0 {
                return Err(io::Error::other("the command's main thread was not found"));
            }
            Ok(())
        }
    }

    /// Sends CTRL_BREAK to the console process group `group`; false if it could not
    /// (singleflight has no console).
    pub fn ctrl_break(group: u32) -> bool {
        // SAFETY: a plain Win32 call.
        unsafe { GenerateConsoleCtrlEvent(CTRL_BREAK_EVENT, group) != 0 }
    }

    type CtrlHandler = Box<dyn Fn(i32) + Send>;
    static ON_CTRL: Mutex<Option<CtrlHandler>> = Mutex::new(None);

    /// While `handler` is set, Ctrl+C and Ctrl+Break at singleflight's console call it
    /// with the matching signal number (SIGINT 2, SIGBREAK 21) instead of ending the
    /// process. `None` restores the default.
    pub fn on_ctrl(handler: Option<CtrlHandler>) {
        let install = handler.is_some();
        *ON_CTRL.lock().unwrap_or_else(|e| e.into_inner()) = handler;
        // SAFETY: `forward` is a valid handler for the life of the process.
        unsafe { SetConsoleCtrlHandler(Some(forward), if install { TRUE } else { FALSE }) };
    }

    unsafe extern "system" fn forward(event: u32) -> i32 {
        let signal = match event {
            CTRL_C_EVENT => 2,
            CTRL_BREAK_EVENT => 21,
            // Close, logoff, shutdown: the process ends anyway, and the job with it.
            _ => return FALSE,
        };
        match &*ON_CTRL.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(handler) => {
                handler(signal);
                TRUE
            }
            None => FALSE,
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod linux {
    use std::fs;

    use rustix::process::{Pid, Signal, WaitOptions};

    use crate::record::RunRecord;

    /// The fields of `/proc/PID/stat` that identify a process and place it in a tree.
    #[derive(Clone, Copy)]
    pub struct Stat {
        pub pid: u32,
        pub state: u8,
        pub ppid: u32,
        pub pgrp: u32,
        pub start_ticks: u64,
    }

    impl Stat {
        pub fn read(pid: u32) -> Option<Stat> {
            let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name (field 2) may hold spaces and parentheses: split after
            // the last ')'. Fields from 3 on: state, ppid, pgrp, … starttime is 22.
            let (_, rest) = text.rsplit_once(')')?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(Stat {
                pid,
                state: *fields.first()?.as_bytes().first()?,
                ppid: fields.get(1)?.parse().ok()?,
                pgrp: fields.get(2)?.parse().ok()?,
                start_ticks: fields.get(19)?.parse().ok()?,
            })
        }

        fn alive(&self) -> bool {
            !matches!(self.state, b'Z' | b'X')
        }
    }

    fn all_processes() -> Vec<Stat> {
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(Stat::read)
            .collect()
    }

    /// Every process below `root` in the tree (not `root` itself).
    pub fn descendants(root: u32) -> Vec<Stat> {
        let processes = all_processes();
        let mut found = Vec::new();
        let mut parents = vec![root];
        while let Some(parent) = parents.pop() {
            for p in processes.iter().filter(|p| p.ppid == parent) {
                parents.push(p.pid);
                found.push(*p);
            }
        }
        found
    }

    /// Sends `signal`; false only if the process exists and may not be signalled
    /// (EPERM: a setuid program, say).
    pub fn kill(stat: Stat, signal: Signal) -> bool {
        Pid::from_raw(stat.pid as i32).is_none_or(|pid| {
            !matches!(rustix::process::kill_process(pid, signal), Err(e) if e == rustix::io::Errno::PERM)
        })
    }

    /// Kills and reaps every descendant until none is left. Orphans are reparented to
    /// singleflight (a subreaper) as their parents die, so each pass finds the next
    /// generation; SIGKILLed processes cannot fork, so the passes end. A process that
    /// may not be killed is left (and not waited for), or this would never return.
    pub fn reap_descendants(command_pid: u32) {
        let me = std::process::id();
        let mut unkillable = std::collections::HashSet::new();
        loop {
            let rest: Vec<Stat> = descendants(me)
                .into_iter()
                .filter(|p| !unkillable.contains(&p.pid) && (p.alive() || p.ppid == me))
                .collect();
            if rest.is_empty() {
                return;
            }
            for stat in &rest {
                if stat.alive() && !kill(*stat, Signal::KILL) {
                    unkillable.insert(stat.pid);
                }
            }
            let children: Vec<u32> = rest
                .iter()
                .filter(|p| p.ppid == me && p.pid != command_pid && !unkillable.contains(&p.pid))
                .map(|p| p.pid)
                .collect();
            for child in &children {
                if let Some(pid) = Pid::from_raw(*child as i32) {
                    let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
                }
            }
            if children.is_empty() {
                // Only grandchildren whose parents are dying: give the kernel a moment
                // to reparent them to us.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    fn carries_token(pid: u32, needle: &[u8]) -> bool {
        fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle))
    }

    pub fn kill_remains(record: &RunRecord) {
        if record.token.is_empty() || record.boot_id != super::boot_id() {
            return;
        }
        let needle = format!("{}={}", super::RUN_ID_ENV, record.token).into_bytes();
        // The group id is the command's pid. It is still this run's group unless the
        // pid now names another process: a pid in use as a group id is never reused,
        // so a different process with that pid means the old group is gone.
        let group_is_ours = record.pid != 0
            && Stat::read(record.pid).is_none_or(|leader| leader.start_ticks == record.start_ticks);
        let me = std::process::id();
        // Bounded: each pass kills all it finds, and a killed process cannot fork.
        for _ in 0..100 {
            let remains: Vec<Stat> = all_processes()
                .into_iter()
                .filter(|p| p.alive() && p.pid != me && p.start_ticks >= record.start_ticks)
                .filter(|p| {
                    (group_is_ours && p.pgrp == record.pid) || carries_token(p.pid, &needle)
                })
                .collect();
            if remains.is_empty() {
                return;
            }
            for stat in remains {
                kill(stat, Signal::KILL);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}
