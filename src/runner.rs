//! The one way Lodestone runs an external program.
//!
//! Argument vectors only (never a shell), stdin closed, stdout and stderr
//! captured, a timeout per call with the child killed (and reaped) when it
//! expires, and a count of spawns per program so benchmarks and metrics can
//! show what each CSI call cost.
//!
//! Cancellation rule: a started command runs to its own end. A CSI deadline
//! or a dropped connection drops the caller's future; killing `lvm`, `mkfs`
//! or `rbd map` then could leave half-done work behind (a device-mapper
//! device left suspended). So the child is waited for in a task of its own
//! and the caller only awaits the result; only the command's own timeout
//! kills it.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the latency histograms, of commands and of CSI
/// calls alike: 1 ms to 5 min.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// A program invocation: program name or path, arguments, extra environment.
#[derive(Debug, Clone)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    pub timeout: Option<Duration>,
}

impl Cmd {
    pub fn new(program: impl Into<String>) -> Self {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            timeout: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The command line for logs and error messages. Callers never put
    /// secrets in argv, so this is safe to print.
    pub fn display(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

/// What a finished program left behind.
#[derive(Debug, Clone)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{command} timed out after {seconds}s and was killed")]
    Timeout { command: String, seconds: u64 },
    #[error("{command} failed with exit code {code}: {stderr}")]
    Failed {
        command: String,
        code: i32,
        stderr: String,
        stdout: String,
    },
    #[error("{command} printed output that could not be parsed: {reason}")]
    Parse { command: String, reason: String },
}

impl RunError {
    /// Standard error of a failed command (empty for other errors).
    pub fn stderr(&self) -> &str {
        match self {
            RunError::Failed { stderr, .. } => stderr,
            _ => "",
        }
    }

    pub fn exit_code(&self) -> Option<i32> {
        match self {
            RunError::Failed { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How a command ended, for the metrics: exit code 0, another exit code (or
/// a signal), killed at its timeout, or not started at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    Timeout,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
        }
    }
}

/// Runs commands with a default timeout and counts them.
#[derive(Debug)]
pub struct Runner {
    default_timeout: Duration,
    /// Shared with the tasks that wait for the commands.
    counts: Arc<Counts>,
}

/// The labels of `lodestone_commands_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    program: String,
    outcome: &'static str,
}

/// The labels of `lodestone_command_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS.iter().copied())
}

#[derive(Debug)]
struct Counts {
    spawned: Mutex<BTreeMap<String, u64>>,
    /// Commands by program and outcome.
    outcomes: Family<OutcomeLabels, Counter>,
    /// Run time of the commands that started, by program.
    durations: Family<ProgramLabels, Histogram, fn() -> Histogram>,
}

impl Counts {
    fn record(&self, program: &str, outcome: Outcome, elapsed: Option<Duration>) {
        let program = program.to_string();
        if let Some(elapsed) = elapsed {
            let labels = ProgramLabels {
                program: program.clone(),
            };
            self.durations
                .get_or_create(&labels)
                .observe(elapsed.as_secs_f64());
        }
        let outcome = outcome.as_str();
        self.outcomes
            .get_or_create(&OutcomeLabels { program, outcome })
            .inc();
    }
}

impl Runner {
    pub fn new(default_timeout: Duration) -> Self {
        Runner {
            default_timeout,
            counts: Arc::new(Counts {
                spawned: Mutex::new(BTreeMap::new()),
                outcomes: Family::default(),
                durations: Family::new_with_constructor(duration_histogram),
            }),
        }
    }

    /// How many processes of each program this runner has started.
    pub fn spawn_counts(&self) -> BTreeMap<String, u64> {
        self.counts
            .spawned
            .lock()
            .expect("spawn counter poisoned")
            .clone()
    }

    /// How many commands of `program` ended with `outcome`.
    pub fn outcome_count(&self, program: &str, outcome: Outcome) -> u64 {
        let labels = OutcomeLabels {
            program: program.to_string(),
            outcome: outcome.as_str(),
        };
        self.counts.outcomes.get(&labels).map_or(0, |c| c.get())
    }

    /// Adds this runner's command counters and duration histograms
    /// (`lodestone_command*`) to the registry.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "lodestone_commands",
            "External commands run, by program and outcome (success, failure: non-zero \
             exit, timeout: killed, error: could not be started)",
            self.counts.outcomes.clone(),
        );
        registry.register(
            "lodestone_command_duration_seconds",
            "Run time of external commands that started, by program",
            self.counts.durations.clone(),
        );
    }

    /// Runs the command; a non-zero exit is an error.
    pub async fn run(&self, cmd: &Cmd) -> Result<Output, RunError> {
        let out = self.run_unchecked(cmd).await?;
        if out.code != 0 {
            return Err(RunError::Failed {
                command: cmd.display(),
                code: out.code,
                stderr: out.stderr.trim().to_string(),
                stdout: out.stdout,
            });
        }
        Ok(out)
    }

    /// Runs the command and parses its standard output as JSON.
    pub async fn run_json<T: DeserializeOwned>(&self, cmd: &Cmd) -> Result<T, RunError> {
        let out = self.run(cmd).await?;
        parse_json(cmd, &out.stdout)
    }

    /// Runs the command and returns its output whatever the exit code.
    /// Dropping the returned future does not stop the command (see the
    /// module documentation).
    pub async fn run_unchecked(&self, cmd: &Cmd) -> Result<Output, RunError> {
        let timeout = cmd.timeout.unwrap_or(self.default_timeout);
        let mut command = Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &cmd.env {
            command.env(k, v);
        }
        let started = Instant::now();
        let program = program_name(&cmd.program);
        let child = command.spawn().map_err(|source| {
            self.counts.record(&program, Outcome::Error, None);
            RunError::Spawn {
                program: cmd.program.clone(),
                source,
            }
        })?;
        *self
            .counts
            .spawned
            .lock()
            .expect("spawn counter poisoned")
            .entry(program.clone())
            .or_default() += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (counts, waited) = (self.counts.clone(), cmd.clone());
        tokio::spawn(async move {
            let cmd = waited;
            let result = finish(child, &cmd, timeout).await;
            let elapsed = started.elapsed();
            let outcome = match &result {
                Err(RunError::Timeout { .. }) => Outcome::Timeout,
                Err(_) => Outcome::Error,
                Ok(o) if o.code == 0 => Outcome::Success,
                Ok(_) => Outcome::Failure,
            };
            counts.record(&program, outcome, Some(elapsed));
            if let Ok(o) = &result {
                tracing::debug!(
                    target: "lodestone::runner",
                    command = %cmd.display(),
                    code = o.code,
                    elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                    "ran command"
                );
            }
            if tx.send(result).is_err() {
                tracing::debug!(
                    target: "lodestone::runner",
                    command = %cmd.display(),
                    "the caller left before the command ended; it ran to its end"
                );
            }
        });
        rx.await.unwrap_or_else(|_| {
            Err(RunError::Spawn {
                program: program_name(&cmd.program),
                source: std::io::Error::other("the task waiting for the command ended"),
            })
        })
    }
}

/// Waits for a started child and collects its output; at `timeout` kills it
/// and reaps it.
async fn finish(mut child: Child, cmd: &Cmd, timeout: Duration) -> Result<Output, RunError> {
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let waited = tokio::time::timeout(timeout, async {
        let (status, o, e) = tokio::join!(
            child.wait(),
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err)
        );
        o?;
        e?;
        status
    })
    .await;
    let status = match waited {
        Err(_) => {
            tracing::warn!(command = %cmd.display(), ?timeout, "command timed out; killed");
            if let Err(e) = child.kill().await {
                tracing::warn!(command = %cmd.display(), error = %e, "cannot kill command");
            }
            return Err(RunError::Timeout {
                command: cmd.display(),
                seconds: timeout.as_secs(),
            });
        }
        Ok(Err(source)) => {
            return Err(RunError::Spawn {
                program: cmd.program.clone(),
                source,
            })
        }
        Ok(Ok(status)) => status,
    };
    Ok(Output {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    })
}

pub fn parse_json<T: DeserializeOwned>(cmd: &Cmd, text: &str) -> Result<T, RunError> {
    serde_json::from_str(text).map_err(|e| RunError::Parse {
        command: cmd.display(),
        reason: e.to_string(),
    })
}

fn program_name(program: &str) -> String {
    program.rsplit('/').next().unwrap_or(program).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_output_and_exit_codes() {
        let r = Runner::new(Duration::from_secs(5));
        let out = r
            .run(&Cmd::new("sh").args(["-c", "echo out; echo err >&2"]))
            .await
            .unwrap();
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        let err = r
            .run(&Cmd::new("sh").args(["-c", "echo boom >&2; exit 3"]))
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), Some(3));
        assert_eq!(err.stderr(), "boom");
        assert_eq!(r.spawn_counts().get("sh"), Some(&2));
        assert_eq!(r.outcome_count("sh", Outcome::Success), 1);
        assert_eq!(r.outcome_count("sh", Outcome::Failure), 1);
    }

    #[tokio::test]
    async fn arguments_never_reach_a_shell() {
        let r = Runner::new(Duration::from_secs(5));
        let out = r
            .run(&Cmd::new("echo").arg("$(id); `id` | ;"))
            .await
            .unwrap();
        assert_eq!(out.stdout, "$(id); `id` | ;\n");
    }

    #[tokio::test]
    async fn kills_on_timeout() {
        let r = Runner::new(Duration::from_secs(5));
        let started = Instant::now();
        let err = r
            .run(
                &Cmd::new("sleep")
                    .arg("30")
                    .timeout(Duration::from_millis(200)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Timeout { .. }));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(r.outcome_count("sleep", Outcome::Timeout), 1);
    }

    /// `sh -c 'sleep SECONDS; touch FILE'`, and the file.
    fn touch_later(dir: &tempfile::TempDir, seconds: &str) -> (Cmd, std::path::PathBuf) {
        let file = dir.path().join("done");
        let cmd = Cmd::new("sh")
            .args(["-c", "sleep \"$0\"; touch \"$1\""])
            .arg(seconds)
            .arg(&file);
        (cmd, file)
    }

    async fn appears_within(file: &std::path::Path, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if file.exists() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        file.exists()
    }

    #[tokio::test]
    async fn a_caller_that_leaves_does_not_stop_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let (cmd, file) = touch_later(&dir, "1");
        let r = Runner::new(Duration::from_secs(10));
        let gave_up = tokio::time::timeout(Duration::from_millis(100), r.run(&cmd)).await;
        assert!(gave_up.is_err(), "the command ended within 100 ms");
        assert!(!file.exists());
        assert!(
            appears_within(&file, Duration::from_secs(10)).await,
            "the command was stopped when its caller left"
        );
        // Still counted, though nobody waited for it.
        let started = Instant::now();
        while r.outcome_count("sh", Outcome::Success) == 0 {
            assert!(started.elapsed() < Duration::from_secs(5), "never counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(r.spawn_counts().get("sh"), Some(&1));
    }

    #[tokio::test]
    async fn its_own_timeout_still_kills_a_command_whose_caller_left() {
        let dir = tempfile::tempdir().unwrap();
        let (cmd, file) = touch_later(&dir, "1");
        let r = Runner::new(Duration::from_secs(10));
        let cmd = cmd.timeout(Duration::from_millis(300));
        let gave_up = tokio::time::timeout(Duration::from_millis(100), r.run(&cmd)).await;
        assert!(gave_up.is_err());
        assert!(
            !appears_within(&file, Duration::from_millis(1500)).await,
            "the command outlived its timeout"
        );
        assert_eq!(r.outcome_count("sh", Outcome::Timeout), 1);
    }

    #[tokio::test]
    async fn missing_program_and_bad_json() {
        let r = Runner::new(Duration::from_secs(5));
        let err = r
            .run(&Cmd::new("/nonexistent/lodestone-x"))
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Spawn { .. }));
        assert_eq!(r.outcome_count("lodestone-x", Outcome::Error), 1);
        let err = r
            .run_json::<serde_json::Value>(&Cmd::new("echo").arg("{nope"))
            .await;
        assert!(matches!(err, Err(RunError::Parse { .. })));
    }

    #[tokio::test]
    async fn renders_command_metrics() {
        let r = Runner::new(Duration::from_secs(5));
        r.run(&Cmd::new("/bin/true")).await.unwrap();
        assert_eq!(r.outcome_count("true", Outcome::Failure), 0);
        let mut registry = Registry::default();
        r.register_metrics(&mut registry);
        let mut page = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut page, &registry).unwrap();
        assert!(
            page.contains("# TYPE lodestone_commands_total counter\n"),
            "{page}"
        );
        assert!(
            page.contains("lodestone_commands_total{program=\"true\",outcome=\"success\"} 1\n"),
            "{page}"
        );
        assert!(
            page.contains("lodestone_command_duration_seconds_count{program=\"true\"} 1\n"),
            "{page}"
        );
        assert!(
            page.contains(
                "lodestone_command_duration_seconds_bucket{program=\"true\",le=\"300\"} 1\n"
            ),
            "{page}"
        );
        assert!(
            !page.contains("outcome=\"failure\""),
            "asking for a count adds no series: {page}"
        );
    }

    #[test]
    fn default_buckets_span_a_millisecond_to_five_minutes() {
        assert_eq!(DURATION_BUCKETS.first(), Some(&0.001));
        assert_eq!(DURATION_BUCKETS.last(), Some(&300.0));
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
