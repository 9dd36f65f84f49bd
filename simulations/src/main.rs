//! `cargo run --release -p simulations -- <scenario> [--nodes N] [--seed S] [--keys K] [--partitions P] [--sweep]`
//!
//! Prints `metric: <name> <value> <unit>` lines. Exits 1 with a one-line
//! reason when an invariant is violated, 2 on bad usage.

use simulations::scenarios::{run, Params, SCENARIOS};
use std::process::ExitCode;
use std::time::Instant;

fn usage() -> String {
    format!(
        "usage: simulations <scenario> [--nodes N] [--seed S] [--keys K] [--partitions P] [--sweep]\nscenarios: {}",
        SCENARIOS.join(", ")
    )
}

fn parse(args: &[String]) -> Result<(String, Params), String> {
    let mut params = Params::default();
    let mut scenario = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or_else(|| format!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{name}: {v:?} is not a non-negative integer"))
        };
        match arg.as_str() {
            "--nodes" => params.nodes = Some(value("--nodes")? as usize),
            "--seed" => params.seed = value("--seed")?,
            "--keys" => params.keys = Some(value("--keys")?),
            "--partitions" => {
                let p = value("--partitions")?;
                params.partitions = u16::try_from(p)
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| format!("--partitions must be 1..=65535, not {p}"))?;
            }
            "--sweep" => params.sweep = true,
            "-h" | "--help" => return Err(usage()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}\n{}", usage())),
            s if scenario.is_none() => scenario = Some(s.to_string()),
            s => return Err(format!("unexpected argument {s}\n{}", usage())),
        }
    }
    let scenario = scenario.ok_or_else(usage)?;
    if !SCENARIOS.contains(&scenario.as_str()) {
        return Err(format!("unknown scenario {scenario:?}\n{}", usage()));
    }
    if params.nodes == Some(0) {
        return Err("--nodes must be at least 1".into());
    }
    Ok((scenario, params))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (scenario, params) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    eprintln!("running {scenario} (seed {})", params.seed);
    let started = Instant::now();
    match run(&scenario, &params) {
        Ok(report) => {
            for m in &report.metrics {
                println!("metric: {} {:.3} {}", m.name, m.value, m.unit);
            }
            eprintln!("{scenario}: ok in {:.1}s", started.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(violation) => {
            eprintln!(
                "{scenario} (seed {}): invariant violated: {}",
                params.seed, violation.0
            );
            ExitCode::from(1)
        }
    }
}
