//! `monitor`: the agent and its CLI. This file only dispatches.

use std::io::Write;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use monitor::{
    api::{EventPayload, FlowRow, ReportPayload, Status},
    cli::{Cli, Command, FlowSort},
    query::{Client, Request},
    render,
};

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let socket = cli.socket.clone();
    match cli.command {
        Command::Run(args) => {
            let cfg = args.effective(&socket)?;
            if args.print_config {
                print!(
                    "{}",
                    toml::to_string(&cfg).context("printing the configuration")?
                );
                return Ok(());
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(monitor::agent::run(cfg))
        }
        Command::Status(a) => {
            let v = Client::call(&socket, &Request::Status)?;
            if a.json {
                return print_json(&v);
            }
            let s: Status = serde_json::from_value(v)?;
            print!("{}", render::status(&s));
            Ok(())
        }
        Command::Flows(a) => {
            let v = Client::call(&socket, &Request::Flows)?;
            let mut rows: Vec<FlowRow> = serde_json::from_value(v)?;
            rows.retain(|r| {
                a.path.as_ref().is_none_or(|p| &r.path == p)
                    && a.min_silence.is_none_or(|m| r.silence_seconds >= m)
            });
            match a.sort {
                FlowSort::Silence => {
                    rows.sort_by(|x, y| y.silence_seconds.total_cmp(&x.silence_seconds))
                }
                FlowSort::Age => rows.sort_by(|x, y| y.age_seconds.total_cmp(&x.age_seconds)),
                FlowSort::Bytes => {
                    rows.sort_by_key(|r| std::cmp::Reverse(r.bytes_in + r.bytes_out))
                }
                FlowSort::Client => rows.sort_by(|x, y| x.client.cmp(&y.client)),
            }
            if a.limit > 0 {
                rows.truncate(a.limit);
            }
            if a.json {
                return print_json(&serde_json::to_value(&rows)?);
            }
            print!("{}", render::flows(&rows));
            Ok(())
        }
        Command::Report(a) => {
            let v = Client::call(&socket, &Request::Report)?;
            let r: ReportPayload = serde_json::from_value(v)?;
            if a.json {
                return print_json(&r.report);
            }
            print!("{}", r.text);
            Ok(())
        }
        Command::Events(a) => {
            let mut c = Client::connect(&socket)?;
            c.send(&Request::Events { follow: a.follow })?;
            let mut out = std::io::stdout().lock();
            while let Some(v) = c.read_line()? {
                let e: EventPayload = serde_json::from_value(v)?;
                let line = if a.json {
                    serde_json::to_string(&e.verdict)?
                } else {
                    e.text
                };
                // A closed pipe (| head) ends the command quietly.
                if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
            Ok(())
        }
        Command::Analyze(a) => {
            let opts = a.options()?;
            let analysis = monitor::analyze::analyze(&a.file, &opts)?;
            if a.json {
                return print_json(&serde_json::to_value(&analysis)?);
            }
            println!("{}\n", analysis.capture.summary());
            print!("{}", analysis.report.to_text());
            Ok(())
        }
        Command::Uninstall { pin_path, config } => {
            let dir = match (pin_path, config) {
                (Some(p), _) => p,
                (None, Some(c)) => monitor::config::FileConfig::load(&c)?
                    .agent
                    .pin_path
                    .context("the configuration has no [agent] pin_path: nothing is pinned")?,
                (None, None) => std::path::PathBuf::from(monitor::pins::DEFAULT_PIN_PATH),
            };
            let removed = monitor::pins::remove_all(&dir)?;
            if removed.is_empty() {
                println!("nothing pinned in {}", dir.display());
            } else {
                println!("removed from {}: {}", dir.display(), removed.join(", "));
            }
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "monitor",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Manpage => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .context("rendering the man page"),
    }
}
