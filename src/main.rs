use clap::Parser;
use tracing_subscriber::EnvFilter;

use lodestone::config::{Cli, Command, LogFormat};

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
        Some(Command::Demo(demo)) => lodestone::demo::run(&demo).await,
        Some(Command::Ctl(ctl)) => std::process::exit(lodestone::ctl::run(&cli.run, &ctl).await),
    };
    if let Err(e) = result {
        tracing::error!("{e}");
        eprintln!("lodestone: {e}");
        std::process::exit(1);
    }
}

async fn serve(args: lodestone::config::RunArgs) -> Result<(), String> {
    let socket = args.socket_path()?;
    let metrics = lodestone::metrics::bind(&args.metrics_address).await?;
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
