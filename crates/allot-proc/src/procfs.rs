//! Reading `/proc`: a process's stat line, its tasks' CPU time in nanoseconds
//! (`/proc/PID/task/TID/schedstat`, falling back to `stat`'s clock ticks), its owner,
//! and a snapshot of every process for the selectors.

use std::fs;
use std::os::unix::fs::MetadataExt;

use crate::error::ProcError;

/// The fields of `/proc/PID/stat` that allot uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatFields {
    /// Process (or task) ID.
    pub pid: i32,
    /// Command name (`comm`), without the parentheses.
    pub comm: String,
    /// State letter: R running, S sleeping, D disk wait, T stopped, Z zombie, …
    pub state: char,
    /// Parent PID.
    pub ppid: i32,
    /// User-mode CPU time in clock ticks.
    pub utime_ticks: u64,
    /// Kernel-mode CPU time in clock ticks.
    pub stime_ticks: u64,
    /// Start time after boot in clock ticks: with the PID, it names one process for good.
    pub start_time_ticks: u64,
}

/// Parses a `stat` line. The command name may hold spaces and parentheses, so the
/// fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<StatFields> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field k is rest[k - 3].
    let field = |k: usize| rest.get(k - 3).copied();
    Some(StatFields {
        pid,
        comm,
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        utime_ticks: field(14)?.parse().ok()?,
        stime_ticks: field(15)?.parse().ok()?,
        start_time_ticks: field(22)?.parse().ok()?,
    })
}

/// Parses a `schedstat` line: the first field is time on the CPU in nanoseconds.
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Parses a `schedstat` line's first two fields: time on the CPU and time spent waiting
/// on a run queue for one, both in nanoseconds.
pub fn parse_schedstat_run_wait(text: &str) -> Option<(u64, u64)> {
    let mut it = text.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Kernel clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 if unknown).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions and only reads a constant.
    let t = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Converts clock ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    ticks.saturating_mul(1_000_000_000 / clock_ticks_per_sec())
}

/// Reads and parses `/proc/PID/stat`: one `read` into a buffer that holds any stat line
/// (the kernel writes the whole line at once), so open, read and close are the only
/// system calls; the loops read these every second.
pub fn read_stat(pid: i32) -> Result<StatFields, ProcError> {
    let path = format!("/proc/{pid}/stat");
    let io = |e| gone_or_io(pid, &path, e);
    let mut file = fs::File::open(&path).map_err(io)?;
    let mut buf = [0u8; 2048];
    let mut len = 0;
    while len < buf.len() {
        match std::io::Read::read(&mut file, &mut buf[len..]).map_err(io)? {
            0 => break,
            n => len += n,
        }
        // A line read whole ends with a newline: no need to ask again for the end.
        if buf[len - 1] == b'\n' {
            break;
        }
    }
    // A command name may hold any bytes.
    parse_stat(&String::from_utf8_lossy(&buf[..len])).ok_or(ProcError::Gone { pid })
}

pub(crate) fn gone_or_io(pid: i32, path: &str, e: std::io::Error) -> ProcError {
    match e.raw_os_error() {
        Some(nix::libc::ENOENT) | Some(nix::libc::ESRCH) => ProcError::Gone { pid },
        _ => ProcError::io(path, e),
    }
}

/// The owner of a process.
pub fn uid_of(pid: i32) -> Result<u32, ProcError> {
    let path = format!("/proc/{pid}");
    fs::metadata(&path)
        .map(|m| m.uid())
        .map_err(|e| gone_or_io(pid, &path, e))
}

/// The thread IDs of a process.
pub fn task_ids(pid: i32) -> Result<Vec<i32>, ProcError> {
    let path = format!("/proc/{pid}/task");
    let dir = fs::read_dir(&path).map_err(|e| gone_or_io(pid, &path, e))?;
    Ok(dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// Total CPU time of a process's live threads, in nanoseconds (one-shot; the scheduler
/// uses [`crate::handle::ProcHandle`], which keeps the files open).
pub fn cpu_ns(pid: i32) -> Result<u64, ProcError> {
    let mut total = 0u64;
    let mut any = false;
    for tid in task_ids(pid)? {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")) {
            if let Some(ns) = parse_schedstat(&text) {
                total += ns;
                any = true;
                continue;
            }
        }
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) {
            if let Some(s) = parse_stat(&text) {
                total += ticks_to_ns(s.utime_ticks + s.stime_ticks);
                any = true;
            }
        }
    }
    if any {
        Ok(total)
    } else {
        Err(ProcError::Gone { pid })
    }
}

/// One process as the selectors see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// PID.
    pub pid: i32,
    /// Parent PID.
    pub ppid: i32,
    /// Owner.
    pub uid: u32,
    /// Command name.
    pub comm: String,
    /// State letter.
    pub state: char,
    /// Start time in clock ticks after boot.
    pub start_time_ticks: u64,
}

/// Every process visible in `/proc` right now (processes that vanish while being read
/// are skipped).
pub fn snapshot() -> Result<Vec<ProcessInfo>, ProcError> {
    let dir = fs::read_dir("/proc").map_err(|e| ProcError::io("/proc", e))?;
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        out.extend(process_info(pid));
    }
    Ok(out)
}

/// These processes and this process's ancestors, read one by one: all that selectors
/// naming fixed PIDs need (and the ancestors are what [`crate::selector::protected_pids`]
/// protects), without reading every process.
pub fn snapshot_of(pids: impl IntoIterator<Item = i32>) -> Vec<ProcessInfo> {
    let mut out: Vec<ProcessInfo> = pids.into_iter().filter_map(process_info).collect();
    let mut cur = std::process::id() as i32;
    while cur > 0 && !out.iter().any(|p| p.pid == cur) {
        let Some(info) = process_info(cur) else { break };
        cur = info.ppid;
        out.push(info);
    }
    out
}

/// One process's selector view, `None` if it is gone or unreadable.
fn process_info(pid: i32) -> Option<ProcessInfo> {
    let stat = read_stat(pid).ok()?;
    let uid = uid_of(pid).ok()?;
    Some(ProcessInfo {
        pid,
        ppid: stat.ppid,
        uid,
        comm: stat.comm,
        state: stat.state,
        start_time_ticks: stat.start_time_ticks,
    })
}

/// This process's own CPU time in nanoseconds (all its threads).
pub fn self_cpu_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_comm() {
        let line = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 1 0 98765 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.pid, 1234);
        assert_eq!(s.comm, "a (b) c");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.utime_ticks, 250);
        assert_eq!(s.stime_ticks, 30);
        assert_eq!(s.start_time_ticks, 98765);
    }

    #[test]
    fn parses_schedstat() {
        assert_eq!(parse_schedstat("123456789 2000 7\n"), Some(123456789));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(
            parse_schedstat_run_wait("123456789 2000 7\n"),
            Some((123456789, 2000))
        );
        assert_eq!(parse_schedstat_run_wait("5"), None);
    }

    #[test]
    fn reads_itself() {
        let me = std::process::id() as i32;
        let s = read_stat(me).unwrap();
        assert_eq!(s.pid, me);
        assert!(cpu_ns(me).unwrap() > 0);
        assert!(snapshot().unwrap().iter().any(|p| p.pid == me));
        let parent = s.ppid;
        let few = snapshot_of([parent, i32::MAX]);
        assert!(few.iter().any(|p| p.pid == me) && few.iter().any(|p| p.pid == parent));
        assert!(!few.iter().any(|p| p.pid == i32::MAX));
        assert!(matches!(read_stat(i32::MAX), Err(ProcError::Gone { .. })));
    }
}
