//! The `lodestone` command: serves the driver (the default), or runs the
//! operator client (`ctl`) or the demo on top of it.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use lodestone::config::{ConfigError, LogFormat, RunArgs};
use lodestone::ctl::CtlArgs;
use lodestone::demo::DemoArgs;
use lodestone::server::ServerError;

#[derive(Debug, Parser)]
#[command(
    name = "lodestone",
    version,
    about = "Lodestone CSI driver (LVM and Ceph RBD)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the CSI driver (the default when no subcommand is given).
    Serve,
    /// Walk one volume through its whole life on a throw-away loop-file
    /// volume group, printing each step. Needs root and device-mapper.
    Demo(DemoArgs),
    /// A CSI client for operators: call the driver on `--endpoint`.
    Ctl(CtlArgs),
}

/// Why the driver did not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The metrics endpoint could not listen (its text names the flag).
    #[error("{0}")]
    Metrics(String),
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The demo's own errors.
    #[error("{0}")]
    Demo(String),
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.compact().init(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cli = Cli::parse();
    // The demo and ctl print their own output; only warnings and errors
    // interleave.
    let default_filter = if matches!(cli.command, Some(Command::Demo(_) | Command::Ctl(_))) {
        "warn"
    } else {
        "info"
    };
    init_logging(cli.run.log_format, default_filter);
    let result = match cli.command {
        None | Some(Command::Serve) => serve(cli.run).await,
        Some(Command::Demo(demo)) => lodestone::demo::run(&demo).await.map_err(StartError::Demo),
        Some(Command::Ctl(ctl)) => std::process::exit(lodestone::ctl::run(&cli.run, &ctl).await),
    };
    if let Err(e) = result {
        // Once, through the log (text or JSON as --log-format says); every
        // error's text already carries its cause's.
        tracing::error!("{e}");
        std::process::exit(1);
    }
}

async fn serve(args: RunArgs) -> Result<(), StartError> {
    let socket = args.socket_path()?;
    let metrics = lodestone::metrics::bind(&args.metrics_address)
        .await
        .map_err(|e| StartError::Metrics(e.to_string()))?;
    let services = lodestone::server::build(&args).await?;
    if let Some(listener) = metrics {
        let limits = lodestone::metrics::HttpLimits::default();
        lodestone::metrics::spawn(listener, services.metrics.clone(), limits);
    }
    let listener = lodestone::server::bind(&socket)?;
    tracing::info!(
        driver = %args.driver_name(), mode = ?args.mode, socket = %socket.display(),
        version = env!("CARGO_PKG_VERSION"), "serving CSI"
    );
    lodestone::server::serve(services, listener, lodestone::server::termination()).await?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
