//! `lodestone ctl`: a CSI client for operators.
//!
//! Calls the driver on `--endpoint` (a Unix socket) one RPC or a few at a
//! time and prints the answer as compact text or as one JSON document. A
//! failed call prints its gRPC code and message on stderr and exits 1; a
//! command line that cannot be used exits 2. Secrets come from a file or
//! standard input (`--secrets-file`), never from the command line, which
//! every user of the machine can see; they are sent to the driver and never
//! printed, not even in error messages.
//!
//! ctl sits above the driver: it speaks to it only over the CSI socket and
//! nothing in the driver imports it. [`args`] is the command line and what
//! is checked before any call, [`calls`] the RPCs of each command, and
//! [`output`] the documents and text they print.

mod args;
mod calls;
mod output;

pub use args::{
    key_value, size, AccessModeArg, CapabilityArgs, CreateVolumeArgs, CtlArgs, CtlCommand, Output,
    Secret, SecretArgs,
};

use std::time::Duration;

use tonic::Status;

use crate::client;
use crate::config::{socket_path, RunArgs};
use args::Prepared;
use calls::Caller;
use output::{code_name, error_chain};

/// Why ctl stops.
#[derive(Debug)]
enum Failure {
    /// The command line cannot be used: exit 2.
    Usage(String),
    /// The driver could not be reached, or a call failed: exit 1.
    Call(String),
}

impl Failure {
    fn status(method: &str, s: &Status) -> Failure {
        Failure::Call(format!(
            "{method}: {}: {}",
            code_name(s.code()),
            s.message()
        ))
    }
}

/// Runs `lodestone ctl` and returns the process exit code.
pub async fn run(run: &RunArgs, args: &CtlArgs) -> i32 {
    match execute(run, args).await {
        Ok(()) => 0,
        Err(Failure::Usage(m)) => {
            eprintln!("lodestone ctl: {m}");
            2
        }
        Err(Failure::Call(m)) => {
            eprintln!("lodestone ctl: {m}");
            1
        }
    }
}

async fn execute(run: &RunArgs, args: &CtlArgs) -> Result<(), Failure> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let socket = socket_path(&run.endpoint).map_err(|e| Failure::Usage(e.to_string()))?;
    // Everything local is checked before connecting.
    let prepared = Prepared::new(&args.command)?;
    let client = match tokio::time::timeout(timeout, client::connect(&socket)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(Failure::Call(format!(
                "cannot connect to {}: {}",
                socket.display(),
                error_chain(&e)
            )))
        }
        Err(_) => {
            return Err(Failure::Call(format!(
                "cannot connect to {}: no answer within {}s",
                socket.display(),
                timeout.as_secs()
            )))
        }
    };
    let mut c = Caller { client, timeout };
    let printed = c.command(&args.command, prepared).await?;
    match args.output {
        Output::Json => println!("{}", printed.json),
        Output::Text => print!("{}", printed.text),
    }
    Ok(())
}
