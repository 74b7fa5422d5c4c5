//! `hndsr-server`: parse the configuration, build the backend, serve until
//! SIGTERM/SIGINT, drain, exit 0. `hndsr-server openapi` prints the OpenAPI
//! document.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use hndsr_server::backend::CancellationToken;
use hndsr_server::config::{Args, Command, Config};
use hndsr_server::server::{Server, build_backend};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let code = e.exit_code();
            let _ = e.print();
            if let Some(source) =
                hndsr_server::config::env_source(&e, |name| std::env::var_os(name).is_some())
            {
                eprintln!("note: {source}");
            }
            return ExitCode::from(u8::try_from(code).unwrap_or(2));
        }
    };
    if let Some(Command::Openapi) = args.command {
        print!("{}", hndsr_server::http::openapi::json());
        return ExitCode::SUCCESS;
    }
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.log_json);
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "exiting");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hndsr-http")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let backend = build_backend(&config.model).context("building the backend")?;
        let listen = config.listen;
        let server = Server::new(config, backend)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        server.run(listener, shutdown).await?;
        Ok::<(), anyhow::Error>(())
    })
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}
