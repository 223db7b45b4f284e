//! The `oc-discovery` binary: parses the command line and runs one command.
//!
//! Exit codes: 0 done; 1 failed (the node refused: its code is printed); 2 bad command line
//! or config file; 3 the admin API could not be used (node unreachable, or token refused).

use std::process::ExitCode;

use oc_discovery::config::{self, Command, NodeConfig};
use oc_discovery::{cli, node};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc malloc: the event path allocates and frees small buffers at a
/// high rate, and glibc's free-list upkeep (`malloc_consolidate`, `unlink_chunk`) showed as
/// ~15 % of the node's CPU in the propagation benchmark (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off for this process. mimalloc gets its memory from the kernel in
/// large runs and hands back what it no longer uses; with huge pages, the first touch of such
/// a run again makes the kernel zero a whole 2 MiB page: `clear_page_erms` under
/// `do_huge_pmd_anonymous_page` was a fifth of the receiving node's CPU in the propagation
/// benchmark (docs/PERFORMANCE.md, "Huge pages"). mimalloc is built not to ask for them
/// (`no_thp`); this covers kernels that hand them out unasked (THP `always`).
#[cfg(target_os = "linux")]
fn no_huge_pages() {
    // SAFETY: integer arguments only; it sets a flag of this process and touches no memory.
    // A kernel that refuses it leaves huge pages as its own setting says: nothing to do then.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[cfg(not(target_os = "linux"))]
fn no_huge_pages() {}

fn main() -> ExitCode {
    no_huge_pages();
    // One process-wide rustls provider (ring), so no TLS client built by a library (NATS,
    // the admin client, the feed's WebSocket) has to guess one if another crate ever
    // compiles a second provider in. Nothing else has installed one yet.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = match config::parse() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Id(args) => cli::id(&args).map(|id| println!("{id}")),
        Command::Peers(args) => cli::peers(&args).map(|out| print!("{out}")),
        Command::Partners(args) => cli::partners(&args).map(|out| print!("{out}")),
        Command::Status(args) => cli::operator::status(&args).map(|out| print!("{out}")),
        Command::Journal(args) => cli::operator::journal(&args).map(|out| print!("{out}")),
        Command::Search(args) => cli::operator::search(&args),
        Command::Publish(args) => cli::operator::publish(&args).map(|out| print!("{out}")),
        Command::Resources(args) => cli::operator::resources(&args).map(|out| print!("{out}")),
        Command::Copy(args) => cli::copy::copy(&args).map(|out| print!("{out}")),
        Command::Completions(args) => {
            print!("{}", cli::operator::completions(&args));
            Ok(())
        }
        Command::Run(args) => run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit_code(&e)
        }
    }
}

/// Log filter when `RUST_LOG` is unset. The NATS client's own lines are off: the node logs
/// each connection event and failed attempt itself, with the server and reason
/// (`RUST_LOG=info,async_nats=debug` shows the client's).
const DEFAULT_LOG: &str = "info,async_nats=off";

/// 3 when the admin API could not be used (unreachable, or the token refused); 1 otherwise.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    if e.downcast_ref::<cli::AdminError>().is_some() {
        ExitCode::from(cli::EXIT_ADMIN_UNAVAILABLE)
    } else {
        ExitCode::FAILURE
    }
}

fn run(args: config::RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG)))
        .with_writer(std::io::stderr)
        .init();
    let cfg = NodeConfig::try_from(args)?;
    let system = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime")
    });
    system.block_on(node::run(cfg, shutdown_signal()))
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
