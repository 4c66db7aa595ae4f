//! Starting and ending the processes of `exec`: each command runs in a job
//! object of its own, so a timeout or `exec_kill` ends the command and every
//! process it started (TerminateJobObject), and a dying agent takes them
//! all with it (JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE).
//!
//! The race this closes: a process assigned to a job *after* it started
//! could have started children first, and those would stay outside the job.
//! So the command is created suspended (CREATE_SUSPENDED: its main thread
//! has not run a single instruction), assigned to the job, and only then is
//! its main thread resumed; everything it starts is in the job from birth
//! (children inherit their parent's job). If the job cannot be made, the
//! caller kills the still-suspended process: nothing runs outside a job.
//!
//! No process-count limit is set (JOB_OBJECT_LIMIT_ACTIVE_PROCESS): Linux
//! has none per command either, and `limits.max_processes` bounds commands.
//!
//! Windows has no signals: `kill` terminates the job (exit code
//! [`KILLED_EXIT_CODE`], like `taskkill /f`); `term`, `int` and `hup` answer
//! "unsupported". `run_as` (another user's token) is not supported.

use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle, RawHandle};
use std::os::windows::process::CommandExt;
use std::process::ExitStatus;

use kvm_agent_protocol::methods::exec::Signal;
use windows_sys::Win32::Foundation::{HANDLE, INVALID_HANDLE_VALUE};
use windows_sys::Win32::System::Diagnostics::ToolHelp::{
    CreateToolhelp32Snapshot, Thread32First, Thread32Next, TH32CS_SNAPTHREAD, THREADENTRY32,
};
use windows_sys::Win32::System::JobObjects::{
    AssignProcessToJobObject, CreateJobObjectW, JobObjectBasicAccountingInformation,
    JobObjectExtendedLimitInformation, QueryInformationJobObject, SetInformationJobObject,
    TerminateJobObject, JOBOBJECT_BASIC_ACCOUNTING_INFORMATION,
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION, JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
};
use windows_sys::Win32::System::Threading::{
    OpenThread, ResumeThread, CREATE_NO_WINDOW, CREATE_SUSPENDED, THREAD_SUSPEND_RESUME,
};
use windows_sys::Win32::System::WindowsProgramming::GetUserNameW;

use super::super::PlatformError;
use super::unsupported;

/// A user to run a command as (`run_as` is not supported on Windows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserIds {
    /// Login name.
    pub name: String,
    /// Home directory.
    pub home: String,
}

/// Users cannot be switched on Windows.
pub fn lookup_user(_name: &str) -> Result<Option<UserIds>, PlatformError> {
    unsupported("run_as")
}

/// The agent's own account (there are no uids on Windows: the argument is
/// ignored): its name (GetUserNameW, `SYSTEM` for a LocalSystem service)
/// and profile folder (`USERPROFILE`), for a command's `USER`, `LOGNAME`
/// and `HOME`.
pub fn lookup_uid(_uid: u32) -> Option<UserIds> {
    let mut buf = [0u16; 257];
    let mut len = buf.len() as u32;
    // SAFETY: `buf` is writable for `len` units.
    if unsafe { GetUserNameW(buf.as_mut_ptr(), &mut len) } == 0 || len == 0 {
        return None;
    }
    // `len` counts the NUL.
    let name = String::from_utf16_lossy(&buf[..(len as usize - 1).min(buf.len())]);
    let home = std::env::var("USERPROFILE").ok()?;
    Some(UserIds { name, home })
}

/// The agent's user id (none on Windows).
pub fn current_uid() -> u32 {
    0
}

/// Terminate, for timeouts.
pub const SIGKILL: i32 = 9;

/// The exit code of the processes of a terminated job.
pub const KILLED_EXIT_CODE: u32 = 1;

/// Only termination is possible on Windows.
pub fn signal_number(s: Signal) -> Result<i32, PlatformError> {
    match s {
        Signal::Kill => Ok(SIGKILL),
        _ => unsupported("signals other than kill"),
    }
}

/// Exit code (Windows has no terminating signals).
pub fn exit_parts(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    (status.code(), None)
}

/// Prepare `cmd` to start suspended (see [`ProcessTree::adopt`]) and
/// without a console window. `user` is always None: `run_as` is refused
/// before (`lookup_user`).
pub fn isolate(cmd: &mut std::process::Command, _user: Option<&UserIds>) {
    cmd.creation_flags(CREATE_SUSPENDED | CREATE_NO_WINDOW);
}

/// A started command and everything it starts: a job object.
#[derive(Debug)]
pub struct ProcessTree {
    pid: u32,
    job: OwnedHandle,
}

impl ProcessTree {
    /// Put `child`, started suspended by a command prepared with
    /// [`isolate`], into a new job object, then let it run. On error the
    /// child is still suspended and in no job: the caller kills it.
    pub fn adopt(child: &tokio::process::Child) -> Result<Self, PlatformError> {
        let (Some(pid), Some(process)) = (child.id(), child.raw_handle()) else {
            return Err(PlatformError::io(
                "the child process",
                io::Error::other("the child has already been waited for"),
            ));
        };
        let job = new_job()?;
        // SAFETY: both handles are valid for the call: the job was just
        // made, the process is owned by `child`, which is borrowed.
        if unsafe { AssignProcessToJobObject(job.as_raw_handle() as HANDLE, process as HANDLE) }
            == 0
        {
            return Err(super::last_error("AssignProcessToJobObject"));
        }
        resume_threads(pid)?;
        Ok(Self { pid, job })
    }

    /// The command's own process id.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// End every process of the job (only [`SIGKILL`] exists here).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        if signal != SIGKILL {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        // SAFETY: the job handle is owned by self and open.
        if unsafe { TerminateJobObject(self.job.as_raw_handle() as HANDLE, KILLED_EXIT_CODE) } == 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether a process of the job still runs.
    pub fn alive(&self) -> bool {
        self.active_processes().is_ok_and(|n| n > 0)
    }

    /// The number of processes of the job still running.
    pub fn active_processes(&self) -> Result<u32, PlatformError> {
        let mut info = JOBOBJECT_BASIC_ACCOUNTING_INFORMATION::default();
        // SAFETY: `info` is writable and its size is the one given.
        let ok = unsafe {
            QueryInformationJobObject(
                self.job.as_raw_handle() as HANDLE,
                JobObjectBasicAccountingInformation,
                (&raw mut info).cast(),
                size_of::<JOBOBJECT_BASIC_ACCOUNTING_INFORMATION>() as u32,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Err(super::last_error("QueryInformationJobObject"));
        }
        Ok(info.ActiveProcesses)
    }
}

/// A new anonymous job whose processes end when its last handle closes.
fn new_job() -> Result<OwnedHandle, PlatformError> {
    // SAFETY: no security attributes and no name: both may be null.
    let raw = unsafe { CreateJobObjectW(std::ptr::null(), std::ptr::null()) };
    if raw.is_null() {
        return Err(super::last_error("CreateJobObjectW"));
    }
    // SAFETY: `raw` is a new handle owned by nobody else.
    let job = unsafe { OwnedHandle::from_raw_handle(raw as RawHandle) };
    let mut limits = JOBOBJECT_EXTENDED_LIMIT_INFORMATION::default();
    limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
    // SAFETY: `limits` is readable and its size is the one given.
    let ok = unsafe {
        SetInformationJobObject(
            job.as_raw_handle() as HANDLE,
            JobObjectExtendedLimitInformation,
            (&raw const limits).cast(),
            size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32,
        )
    };
    if ok == 0 {
        return Err(super::last_error("SetInformationJobObject"));
    }
    Ok(job)
}

/// Resume the threads of the suspended process `pid` (there is one: the
/// main thread; std does not hand out its handle, so it is found by id).
fn resume_threads(pid: u32) -> Result<(), PlatformError> {
    // SAFETY: a thread snapshot takes no pointer.
    let raw = unsafe { CreateToolhelp32Snapshot(TH32CS_SNAPTHREAD, 0) };
    if raw == INVALID_HANDLE_VALUE {
        return Err(super::last_error("CreateToolhelp32Snapshot"));
    }
    // SAFETY: `raw` is a new handle owned by nobody else.
    let snapshot = unsafe { OwnedHandle::from_raw_handle(raw as RawHandle) };
    let mut entry = THREADENTRY32 {
        dwSize: size_of::<THREADENTRY32>() as u32,
        ..Default::default()
    };
    let mut resumed = 0;
    // SAFETY: `entry` is writable with dwSize set, as both calls require.
    let mut more = unsafe { Thread32First(snapshot.as_raw_handle() as HANDLE, &mut entry) } != 0;
    while more {
        if entry.th32OwnerProcessID == pid {
            // SAFETY: OpenThread takes plain values.
            let t = unsafe { OpenThread(THREAD_SUSPEND_RESUME, 0, entry.th32ThreadID) };
            if t.is_null() {
                return Err(super::last_error("OpenThread"));
            }
            // SAFETY: `t` is a new handle owned by nobody else.
            let thread = unsafe { OwnedHandle::from_raw_handle(t as RawHandle) };
            // SAFETY: the thread handle is open with THREAD_SUSPEND_RESUME.
            if unsafe { ResumeThread(thread.as_raw_handle() as HANDLE) } == u32::MAX {
                return Err(super::last_error("ResumeThread"));
            }
            resumed += 1;
        }
        // SAFETY: as for Thread32First.
        more = unsafe { Thread32Next(snapshot.as_raw_handle() as HANDLE, &mut entry) } != 0;
    }
    if resumed == 0 {
        return Err(PlatformError::io(
            "Thread32Next",
            io::Error::other(format!("no thread of process {pid} found to resume")),
        ));
    }
    Ok(())
}

/// What the tests of processes on Windows share: naming a test to run the
/// test executable as, and waiting for processes by pid.
#[cfg(test)]
pub(crate) mod test_support {
    use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle, RawHandle};

    use windows_sys::Win32::Foundation::{HANDLE, WAIT_OBJECT_0, WAIT_TIMEOUT};
    use windows_sys::Win32::System::Threading::{
        OpenProcess, WaitForSingleObject, PROCESS_QUERY_LIMITED_INFORMATION, PROCESS_SYNCHRONIZE,
    };

    /// The libtest name of test `name` in the module whose `module_path!()`
    /// is `module` (libtest names leave out the crate).
    pub fn libtest_name(module: &str, name: &str) -> String {
        let module = module.split_once("::").map_or(module, |(_, m)| m);
        format!("{module}::{name}")
    }

    /// A handle to wait for process `pid`, if it still exists.
    pub fn open_process(pid: u32) -> Option<OwnedHandle> {
        // SAFETY: OpenProcess takes plain values.
        let h = unsafe {
            OpenProcess(
                PROCESS_SYNCHRONIZE | PROCESS_QUERY_LIMITED_INFORMATION,
                0,
                pid,
            )
        };
        // SAFETY: a new handle owned by nobody else.
        (!h.is_null()).then(|| unsafe { OwnedHandle::from_raw_handle(h as RawHandle) })
    }

    /// Whether the process ends within `ms`.
    pub fn ends_within(process: &OwnedHandle, ms: u32) -> bool {
        // SAFETY: the handle is open with SYNCHRONIZE.
        match unsafe { WaitForSingleObject(process.as_raw_handle() as HANDLE, ms) } {
            WAIT_OBJECT_0 => true,
            WAIT_TIMEOUT => false,
            other => panic!("WaitForSingleObject: {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{ends_within, libtest_name, open_process as existing};
    use super::*;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncBufReadExt, BufReader};

    /// A handle to wait for process `pid`, which must exist.
    fn open_process(pid: u32) -> OwnedHandle {
        existing(pid).unwrap_or_else(|| panic!("process {pid} not found"))
    }

    /// What a tree test asks this test executable to be when it runs it.
    const ROLE: &str = "KVA_TEST_TREE_ROLE";

    /// The tree tests run this test executable, filtered to the test itself,
    /// as the processes of a tree (`parent`: start a `sleeper` grandchild,
    /// print its pid, wait for it; `sleeper`: sleep a minute). In such a
    /// process, play the part and return true: the test's own body runs only
    /// in the process the harness started.
    fn play_role(test: &str) -> bool {
        match std::env::var(ROLE).as_deref() {
            Ok("parent") => {
                let exe = std::env::current_exe().unwrap();
                let mut grandchild = std::process::Command::new(exe)
                    .args([
                        "--exact",
                        &libtest_name(module_path!(), test),
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env(ROLE, "sleeper")
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                println!("grandchild={}", grandchild.id());
                // Sleeps as long as the grandchild does.
                let _ = grandchild.wait();
                true
            }
            Ok("sleeper") => {
                std::thread::sleep(Duration::from_secs(60));
                true
            }
            _ => false,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Test `test` as a `parent` command in its tree, and a handle to wait
    /// for its grandchild once that has started.
    async fn start_tree(test: &str) -> (tokio::process::Child, ProcessTree, OwnedHandle) {
        let (mut child, tree) = start_parent(test);
        let pid = grandchild_pid(&mut child).await;
        (child, tree, open_process(pid))
    }

    /// Test `test` as a `parent` command, started like exec starts one.
    fn start_parent(test: &str) -> (tokio::process::Child, ProcessTree) {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            &libtest_name(module_path!(), test),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, "parent")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
        isolate(&mut cmd, None);
        let child = tokio::process::Command::from(cmd).spawn().unwrap();
        let tree = ProcessTree::adopt(&child).unwrap();
        (child, tree)
    }

    /// The grandchild's pid, read from the parent's output.
    async fn grandchild_pid(child: &mut tokio::process::Child) -> u32 {
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the parent ended early");
            // libtest prints "test NAME ... " before it on the same line.
            if let Some((_, pid)) = line.split_once("grandchild=") {
                return pid.trim().parse().unwrap();
            }
        }
    }

    fn until(what: impl Fn() -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn killing_the_tree_ends_the_grandchild_too() {
        const NAME: &str = "killing_the_tree_ends_the_grandchild_too";
        if play_role(NAME) {
            return;
        }
        runtime().block_on(async {
            let (mut child, tree, grandchild) = start_tree(NAME).await;
            assert_eq!(tree.id(), child.id().unwrap());
            // The command and its child at least (a console host may count
            // too: Wine starts one for a console program without a window).
            let before = tree.active_processes().unwrap();
            assert!(before >= 2, "{before} processes in the job");
            // Ending the command alone leaves its child running...
            child.kill().await.unwrap();
            assert!(
                !ends_within(&grandchild, 300),
                "the grandchild died with its parent"
            );
            assert!(until(|| tree.active_processes().is_ok_and(|n| n < before)));
            assert!(tree.alive());
            // ...ending the tree does not.
            tree.signal(SIGKILL).unwrap();
            assert!(ends_within(&grandchild, 10_000), "the grandchild survived");
            assert!(until(|| !tree.alive()));
        });
    }

    #[test]
    fn a_killed_command_exits_with_the_documented_code() {
        const NAME: &str = "a_killed_command_exits_with_the_documented_code";
        if play_role(NAME) {
            return;
        }
        runtime().block_on(async {
            let (mut child, tree, grandchild) = start_tree(NAME).await;
            assert!(tree.signal(2).is_err(), "only kill is possible");
            assert!(!ends_within(&grandchild, 0));
            tree.signal(SIGKILL).unwrap();
            let status = child.wait().await.unwrap();
            assert_eq!(exit_parts(status), (Some(KILLED_EXIT_CODE as i32), None));
            assert!(ends_within(&grandchild, 10_000));
        });
    }

    #[test]
    fn closing_the_job_ends_its_processes() {
        const NAME: &str = "closing_the_job_ends_its_processes";
        if play_role(NAME) {
            return;
        }
        runtime().block_on(async {
            let (mut child, tree, grandchild) = start_tree(NAME).await;
            let parent = open_process(tree.id());
            assert!(!ends_within(&parent, 0));
            drop(tree);
            assert!(ends_within(&parent, 10_000), "the command survived");
            assert!(ends_within(&grandchild, 10_000), "the grandchild survived");
            let _ = child.wait().await;
        });
    }

    #[test]
    fn the_agents_own_account() {
        let me = lookup_uid(current_uid()).unwrap();
        assert!(!me.name.is_empty() && !me.name.contains('\0'), "{me:?}");
        assert_eq!(
            std::env::var("USERNAME").ok().as_deref(),
            Some(me.name.as_str())
        );
        assert!(std::path::Path::new(&me.home).is_dir(), "{me:?}");
    }

    #[test]
    fn signals_map_to_kill_only() {
        assert_eq!(signal_number(Signal::Kill).unwrap(), SIGKILL);
        for s in [Signal::Term, Signal::Int, Signal::Hup] {
            assert!(matches!(
                signal_number(s),
                Err(PlatformError::Unsupported { .. })
            ));
        }
        assert!(matches!(
            lookup_user("Administrator"),
            Err(PlatformError::Unsupported { .. })
        ));
    }
}
