//! `agentbus demo <NAME> [ARGS]...`: the seed systems, end to end, on the embedded
//! engine.
//!
//! Each demo lives in its own module here (`vehicle/`, `etl/`, `context/`) and is added to [`DEMOS`] and to the match in [`run_demo`]. A demo
//! parses its own `args` (everything after the name, flags included) and may read the
//! global `--backend` / `--json` from `global`.

mod context;
mod etl;
mod vehicle;

use crate::{CliError, Global};

/// The demos this build knows, as `(name, one-line description)`; listed in the error
/// for an unknown name.
pub(crate) const DEMOS: &[(&str, &str)] = &[
    (
        "vehicle",
        "seed 000: vehicle data → analysis → engagement → scheduling → feedback → insights",
    ),
    (
        "etl",
        "seed 003: extract → parallel transforms → validate → load as DAG workflows, with a failing agent",
    ),
    (
        "context",
        "seed 004: peers answer a context request from their interaction stores within a timeout",
    ),
];

/// Runs the demo called `name` with its own `args`.
///
/// `--json` and `--backend B` are taken out of `args` into the global options wherever
/// they appear (up to a `--`), so `agentbus demo vehicle --json` means what it means
/// for every other command; the demo gets the rest.
///
/// # Errors
/// A usage error (exit 2) for an unknown demo, naming the ones available; otherwise
/// whatever the demo reports.
pub(crate) async fn run_demo(name: &str, args: &[String], global: &Global) -> anyhow::Result<()> {
    let (global, args) = split_globals(args, global)?;
    match name {
        "vehicle" => vehicle::run_cli(&args, &global).await,
        "etl" => etl::run_cli(&args, &global).await,
        "context" => context::run_cli(&args, &global).await,
        _ => Err(unknown_demo(name).into()),
    }
}

/// Moves `--json`, `--backend B` and `--backend=B` from a demo's arguments into a copy
/// of the global options. Everything after a `--` is left to the demo untouched.
///
/// # Errors
/// A usage error when `--backend` has no value.
fn split_globals(args: &[String], global: &Global) -> Result<(Global, Vec<String>), CliError> {
    let mut global = global.clone();
    let mut rest = Vec::with_capacity(args.len());
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--" => {
                rest.push(arg.clone());
                rest.extend(iter.by_ref().cloned());
            }
            "--json" => global.json = true,
            "--backend" => {
                global.backend = iter
                    .next()
                    .ok_or_else(|| {
                        CliError::usage("--backend needs a value, e.g. --backend memory")
                    })?
                    .clone();
            }
            other => match other.strip_prefix("--backend=") {
                Some(value) => global.backend = value.to_string(),
                None => rest.push(arg.clone()),
            },
        }
    }
    Ok((global, rest))
}

/// The error for a demo name this build does not have.
fn unknown_demo(name: &str) -> CliError {
    let available = if DEMOS.is_empty() {
        "none are available in this build yet".to_string()
    } else {
        let names: Vec<String> = DEMOS
            .iter()
            .map(|(name, about)| format!("{name} ({about})"))
            .collect();
        format!("available: {}", names.join(", "))
    };
    CliError::usage(format!(
        "unknown demo '{}': {available}",
        crate::output::safe(name)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_flags_after_the_name_still_apply() {
        let global = Global {
            backend: "memory".into(),
            json: false,
        };
        let args: Vec<String> = [
            "--fast",
            "--json",
            "--backend",
            "file:x",
            "-n",
            "3",
            "--",
            "--json",
        ]
        .map(String::from)
        .to_vec();
        let (merged, rest) = split_globals(&args, &global).unwrap();
        assert!(merged.json);
        assert_eq!(merged.backend, "file:x");
        assert_eq!(rest, ["--fast", "-n", "3", "--", "--json"]);
        let (merged, _) = split_globals(&["--backend=redis://h".to_string()], &global).unwrap();
        assert_eq!(merged.backend, "redis://h");
        assert_eq!(
            split_globals(&["--backend".to_string()], &global)
                .unwrap_err()
                .code(),
            2
        );
    }

    #[tokio::test]
    async fn unknown_demos_are_usage_errors() {
        let global = Global {
            backend: "memory".into(),
            json: false,
        };
        let error = run_demo("nope", &[], &global).await.unwrap_err();
        let cli = error.downcast_ref::<CliError>().unwrap();
        assert_eq!(cli.code(), 2);
        assert!(cli.to_string().starts_with("unknown demo 'nope'"), "{cli}");
    }
}
