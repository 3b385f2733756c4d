//! Job Objects and console control events, the Windows side of a run's tree: the
//! command is created suspended in its own console process group, put in a Job
//! Object that kills everything in it when closed (so the tree dies with
//! singleflight, however singleflight dies), and only then let go.

use std::ffi::c_void;
use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Stop;
use crate::record::RunRecord;

use windows_sys::Win32::Foundation::{
    FALSE, FILETIME, HANDLE, INVALID_HANDLE_VALUE, TRUE, WAIT_TIMEOUT,
};
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
    CREATE_NEW_PROCESS_GROUP, CREATE_SUSPENDED, GetProcessTimes, OpenProcess, OpenThread,
    PROCESS_ACCESS_RIGHTS, PROCESS_QUERY_LIMITED_INFORMATION, PROCESS_SYNCHRONIZE,
    PROCESS_TERMINATE, ResumeThread, THREAD_SUSPEND_RESUME, TerminateProcess, WaitForSingleObject,
};

/// A run's command: suspended until it is in its job, and the root of a console
/// process group, so that CTRL_BREAK reaches its tree and not singleflight.
pub const RUN_FLAGS: u32 = CREATE_SUSPENDED | CREATE_NEW_PROCESS_GROUP;
/// The exit code of processes killed with the job (the run counts as timed out or
/// interrupted, whatever this is).
const KILLED: u32 = 1;
/// How long a terminated job may take to empty before singleflight goes on.
const EMPTY_PATIENCE: Duration = Duration::from_secs(10);
/// How long `stop` waits for a terminated singleflight to be gone (its handles, its
/// job's among them, closed) before it goes on to wait for the lock.
const EXIT_PATIENCE: Duration = Duration::from_secs(10);

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

/// The command's Job Object.
pub struct Tree {
    pid: u32,
    job: Job,
}

impl Tree {
    pub fn adopt(child: &mut Child) -> io::Result<Tree> {
        let adopted = Job::new().and_then(|job| {
            job.assign(child)?;
            resume(child.id())?;
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

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn signal(&self, stop: Stop) {
        if stop == Stop::Kill || !ctrl_break(self.pid) {
            self.job.terminate();
        }
    }

    pub fn kill_leftovers(self) {
        self.job.terminate();
        self.job.wait_until_empty();
    }
}

/// Nothing to become: the Job Object holds the tree.
pub fn become_subreaper() {}

pub fn prepare(command: &mut Command) {
    std::os::windows::process::CommandExt::creation_flags(command, RUN_FLAGS);
}

/// Nothing remains: the Job Object died with singleflight and took the tree with it.
pub fn kill_remains(_record: &RunRecord) {}

/// Kills `pid` if it provably still is the process created at `start` (its creation
/// time, see [`start_ticks`]): the check and the kill go through one handle, which
/// keeps the pid from being reused in between. There is no asking a process in another
/// console to stop, so [`Stop::Term`] kills too: singleflight is terminated, its handles
/// close, the last one to its command's Job Object among them, and the job kills the
/// command's whole tree (`JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE`). Waits (bounded) until
/// singleflight is gone.
pub fn signal_process(pid: u32, start: u64, _stop: Stop) -> bool {
    let access = PROCESS_QUERY_LIMITED_INFORMATION | PROCESS_TERMINATE | PROCESS_SYNCHRONIZE;
    let Some(process) = open(pid, access) else {
        return false;
    };
    if created(&process) != Some(start) || !alive(&process) {
        return false;
    }
    // SAFETY: the handle is open, with PROCESS_TERMINATE and SYNCHRONIZE.
    unsafe {
        if TerminateProcess(process.as_raw_handle(), KILLED) == 0 {
            return false;
        }
        WaitForSingleObject(process.as_raw_handle(), EXIT_PATIENCE.as_millis() as u32);
    }
    true
}

/// Why [`signal_process`] would not kill `pid`, in words for `stop`.
pub fn unproven(pid: u32, start: u64) -> String {
    if start == 0 {
        return "its record has no creation time (written by an older singleflight); \
                it cannot be proven to be the run's singleflight"
            .to_owned();
    }
    let process = open(pid, PROCESS_QUERY_LIMITED_INFORMATION | PROCESS_SYNCHRONIZE);
    match process.as_ref().map(|p| (created(p), alive(p))) {
        Some((Some(created), true)) if created != start => format!(
            "pid {pid} is another process now (created at {created}, the run's singleflight \
             at {start}, in 100 ns since 1601)"
        ),
        Some((Some(_), true)) => "it could not be terminated".to_owned(),
        Some((None, true)) => "its creation time cannot be read".to_owned(),
        _ => "it is gone".to_owned(),
    }
}

fn open(pid: u32, access: PROCESS_ACCESS_RIGHTS) -> Option<OwnedHandle> {
    // SAFETY: a plain Win32 call; the handle is owned from here on.
    unsafe {
        let handle = OpenProcess(access, FALSE, pid);
        (!handle.is_null()).then(|| OwnedHandle::from_raw_handle(handle))
    }
}

/// A process's creation time, in 100 ns since 1601 (never 0 for a real process).
fn created(process: &OwnedHandle) -> Option<u64> {
    // SAFETY: the handle is open with PROCESS_QUERY_LIMITED_INFORMATION; the out
    // buffers are plain structs.
    unsafe {
        let mut times: [FILETIME; 4] = std::mem::zeroed();
        let [creation, exit, kernel, user] = &mut times;
        let ok = GetProcessTimes(process.as_raw_handle(), creation, exit, kernel, user);
        let at = (u64::from(creation.dwHighDateTime) << 32) | u64::from(creation.dwLowDateTime);
        (ok != 0 && at != 0).then_some(at)
    }
}

/// Whether the process has not exited (a handle keeps an exited one around).
fn alive(process: &OwnedHandle) -> bool {
    // SAFETY: the handle is open with SYNCHRONIZE.
    let waited = unsafe { WaitForSingleObject(process.as_raw_handle(), 0) };
    waited == WAIT_TIMEOUT
}

/// No boot id to read (creation times are absolute: one from an earlier boot names
/// no process of this one).
pub fn boot_id() -> String {
    String::new()
}

/// The creation time of `pid` (`GetProcessTimes`), in 100 ns since 1601; 0 if unknown.
pub fn start_ticks(pid: u32) -> u64 {
    open(pid, PROCESS_QUERY_LIMITED_INFORMATION)
        .and_then(|process| created(&process))
        .unwrap_or(0)
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
