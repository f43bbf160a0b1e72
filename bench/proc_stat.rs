//! CPU time of a process from `/proc/<pid>/stat`, shared by the benchmarks.

use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU time the process used so far, all threads.
pub fn cpu_time(pid: u32) -> Result<Duration, String> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|err| format!("cannot read {path}: {err}"))?;
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let after_name = text.rsplit_once(')').map(|(_, rest)| rest).ok_or_else(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |index: usize| -> Result<f64, String> {
        fields
            .get(index)
            .and_then(|field| field.parse::<f64>().ok())
            .ok_or_else(|| format!("{path}: no CPU time field"))
    };
    Ok(Duration::from_secs_f64((ticks(11)? + ticks(12)?) / TICKS_PER_SECOND))
}
