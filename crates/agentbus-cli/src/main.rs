//! `agentbus`: the command line of the agentbus message bus.
//!
//! This file holds the clap definitions, the dispatch to one module per command, and
//! the one place where an error becomes an exit code:
//!
//! | code | meaning                                                                  |
//! |------|--------------------------------------------------------------------------|
//! | 0    | success                                                                  |
//! | 1    | the operation failed: timeout, no responders, `Full`, backend errors…    |
//! | 2    | bad input: channel, payload, flag, duration, priority… (clap's too)      |
//!
//! Every error is printed as one line, `error: <message>`, on stderr; logs go to
//! stderr as well (`RUST_LOG`, default `warn`), so stdout carries only results.

mod backend;
mod commands;
mod demo;
mod output;

use std::fmt;
use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::commands::{
    bench, coordination, dlq, doctor, observe, publish, repair, request, subscribe,
};

/// The kind `pub` and `req` give a message when `--kind` is not set.
pub(crate) const DEFAULT_KIND: &str = "cli.message";

/// agentbus: a message bus for multi-agent systems.
///
/// Publish, subscribe, send requests, inspect dead letters and statistics on any
/// agentbus backend. Human output by default, `--json` for scripts.
///
/// Exit codes: 0 success; 1 the operation failed (timeout, no responders, a full
/// channel, a backend error); 2 bad input (channel, payload, flag, duration, priority).
#[derive(Debug, Parser)]
#[command(name = "agentbus", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command accepts, before or after the subcommand.
#[derive(Debug, Clone, Args)]
pub(crate) struct Global {
    /// Where messages live: memory, file:DIR, redis://…, nats://…, amqp://…, kafka://…
    /// or postgres://….
    ///
    /// Available in this build: `memory`, `file:DIR`,
    /// `redis://HOST:PORT[/DB][?prefix=NAME]` (Redis 7+; `rediss://` for TLS) and `nats://HOST:PORT[?…]`
    /// (JetStream; see docs/NATS.md for the query options); the others are recognized and
    /// arrive in later releases. With `memory` the engine lives inside this one agentbus
    /// process: a `pub` in one invocation is not seen by a `sub` in another. `file:DIR`
    /// is the durable log in DIR, shared by invocations one after another (append
    /// `?fsync=always|never|interval(MS)&checkpoint=64MiB|off&segment=64MiB&sync_acks=BOOL`
    /// to choose the fsync policy, checkpoint interval, segment size and whether acks
    /// wait for their sync).
    #[arg(
        long,
        global = true,
        env = "AGENTBUS_BACKEND",
        default_value = "memory",
        value_name = "B",
        display_order = 900
    )]
    pub(crate) backend: String,

    /// Print machine-readable JSON on stdout instead of human-readable text.
    #[arg(long, global = true, display_order = 901)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish one message and print its receipt (id, sequence, duplicate).
    #[command(name = "pub")]
    Pub(publish::PubArgs),
    /// Subscribe to a channel pattern and print the messages that arrive.
    #[command(name = "sub")]
    Sub(subscribe::SubArgs),
    /// Send a request, wait for one reply and print it.
    #[command(name = "req")]
    Req(request::ReqArgs),
    /// List, inspect, replay or purge dead letters.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Read the backend's settings and say what a publish receipt guarantees there.
    Doctor,
    /// Show channels, groups and dead-letter counts of the backend; with --store, the
    /// message log and a workflow's status too.
    Stats(observe::StatsArgs),
    /// Print a thread's timeline (who sent what to whom, latencies) from the
    /// interaction store.
    Trace(observe::TraceArgs),
    /// List recorded messages from the interaction store (by agent, kind, thread, time).
    Log(observe::LogArgs),
    /// Run a demo of one of the seed systems end to end on the embedded engine.
    Demo(DemoArgs),
    /// Measure throughput and p50/p99/p999 latency of the backend.
    Bench(bench::BenchArgs),
    /// Make a damaged durable log (file:DIR) openable again, quarantining the damage.
    Repair(repair::RepairArgs),
    /// List the agents heartbeating on the backend: id, capabilities, health, load.
    Agents(coordination::AgentsArgs),
    /// List the supervised tasks recorded on the backend, with their status.
    Tasks(coordination::TasksArgs),
    /// Inspect workflows run by a supervisor.
    #[command(subcommand)]
    Workflow(coordination::WorkflowCommand),
}

/// `agentbus demo <NAME> [ARGS]...`.
#[derive(Debug, Args)]
struct DemoArgs {
    /// Which demo to run.
    #[arg(value_name = "NAME")]
    name: String,
    /// Arguments passed on to the demo.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<String>,
}

/// An error the CLI raises itself, carrying the exit code it stands for.
///
/// Errors from the library travel as [`agentbus::Error`] inside `anyhow` and are
/// mapped by [`exit_code`]; this type is for what the CLI itself decides.
#[derive(Debug)]
pub(crate) struct CliError {
    code: u8,
    message: String,
}

impl CliError {
    /// Bad input (exit 2): the message should say what to do instead.
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }

    /// The operation failed (exit 1).
    pub(crate) fn failed(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_FAILED,
            message: message.into(),
        }
    }

    /// The exit code this error stands for.
    pub(crate) fn code(&self) -> u8 {
        self.code
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// The operation failed.
const EXIT_FAILED: u8 = 1;
/// Bad input.
const EXIT_USAGE: u8 = 2;

/// The exit code for `error`: the one place where errors become codes.
///
/// The first [`CliError`] or [`agentbus::Error`] in the chain decides; anything else
/// (I/O, JSON encoding…) is an operation failure.
fn exit_code(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<CliError>() {
            return e.code();
        }
        if let Some(e) = cause.downcast_ref::<agentbus::Error>() {
            return kind_exit_code(e.kind());
        }
    }
    EXIT_FAILED
}

/// Bad-input kinds exit 2, every other kind 1.
fn kind_exit_code(kind: agentbus::ErrorKind) -> u8 {
    use agentbus::ErrorKind;
    match kind {
        ErrorKind::InvalidChannel
        | ErrorKind::InvalidInput
        | ErrorKind::Schema
        | ErrorKind::MessageKindNotRegistered => EXIT_USAGE,
        _ => EXIT_FAILED,
    }
}

/// Whether `error` is stdout closing under us (`agentbus sub | head -1`): the reader
/// has what it wanted, so that is a quiet, successful end.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error as one line: anyhow's `{:#}` joins the causes with `: `, and any line
/// breaks inside a message are folded.
fn one_line(error: &anyhow::Error) -> String {
    format!("{error:#}")
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    // A second initialisation cannot happen here; ignore the error rather than panic.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let global = cli.global;
    match cli.command {
        Command::Pub(args) => publish::run(&global, args).await,
        Command::Sub(args) => subscribe::run(&global, args).await,
        Command::Req(args) => request::run(&global, args).await,
        Command::Dlq(command) => dlq::run(&global, command).await,
        Command::Doctor => doctor::run(&global).await,
        Command::Stats(args) => observe::run_stats(&global, args).await,
        Command::Trace(args) => observe::run_trace(&global, args).await,
        Command::Log(args) => observe::run_log(&global, args).await,
        Command::Demo(args) => demo::run_demo(&args.name, &args.args, &global).await,
        Command::Bench(args) => bench::run(&global, args).await,
        Command::Repair(args) => repair::run(&global, args).await,
        Command::Agents(args) => coordination::agents(&global, args).await,
        Command::Tasks(args) => coordination::tasks(&global, args).await,
        Command::Workflow(command) => coordination::workflow(&global, command).await,
    }
}

/// mimalloc: the engine allocates per message, and glibc's allocator cost a third of
/// the memory engine's throughput in `agentbus bench` (docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A value clap could not parse (channel, priority, duration, id…): the reason is
        // already in the first line, which says what to do; keep it to that line.
        Err(error) if error.kind() == clap::error::ErrorKind::ValueValidation => {
            let text = error.to_string();
            let first = text.lines().next().unwrap_or("error: invalid value");
            let _ = writeln!(std::io::stderr(), "{first}");
            return ExitCode::from(EXIT_USAGE);
        }
        // Everything else as clap prints it: usage errors exit 2, --help and
        // --version exit 0.
        Err(error) => error.exit(),
    };
    init_tracing();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            // stderr may be closed too; there is nobody left to tell then.
            let _ = writeln!(std::io::stderr(), "error: {}", one_line(&error));
            ExitCode::from(exit_code(&error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentbus::ErrorKind;

    #[test]
    fn clap_definitions_are_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn exit_codes_follow_the_error_kind() {
        for (kind, code) in [
            (ErrorKind::InvalidChannel, 2),
            (ErrorKind::InvalidInput, 2),
            (ErrorKind::Schema, 2),
            (ErrorKind::MessageKindNotRegistered, 2),
            (ErrorKind::Timeout, 1),
            (ErrorKind::NoResponders, 1),
            (ErrorKind::Full, 1),
            (ErrorKind::Backend, 1),
            (ErrorKind::NotFound, 1),
        ] {
            let error = anyhow::Error::new(agentbus::Error::new(kind, "x"));
            assert_eq!(exit_code(&error), code, "{kind}");
            // Context added on the way keeps the kind reachable.
            assert_eq!(exit_code(&error.context("while doing y")), code, "{kind}");
        }
        assert_eq!(exit_code(&anyhow::Error::new(CliError::usage("u"))), 2);
        assert_eq!(exit_code(&anyhow::Error::new(CliError::failed("f"))), 1);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), 1);
    }

    #[test]
    fn errors_print_on_one_line() {
        let error = anyhow::anyhow!("line one\nline two").context("outer");
        assert_eq!(one_line(&error), "outer: line one line two");
    }

    #[test]
    fn broken_pipe_is_recognised_through_context() {
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "pipe");
        assert!(is_broken_pipe(&anyhow::Error::new(io).context("writing")));
        assert!(!is_broken_pipe(&anyhow::anyhow!("no")));
    }
}
