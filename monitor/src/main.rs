//! `monitor`: the agent and its CLI. `main` runs one function per command
//! and prints any error on one line (`monitor: what failed: why`); a closed
//! pipe (`monitor flows | head`) ends quietly.

use std::io::Write;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use monitor::{
    api::{EventPayload, ReportPayload, Status},
    cli::{AnalyzeArgs, Cli, Command, EventsArgs, FlowsArgs, JsonArg, RemedyCommand, RunArgs},
    flows::FlowList,
    query::{Client, Request},
    render,
};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match try_main(Cli::parse()) {
        Ok(()) => {}
        Err(e) if is_broken_pipe(&e) => {}
        Err(e) => {
            eprintln!("monitor: {}", one_line(&e));
            std::process::exit(1);
        }
    }
}

/// The error and its causes on one line, never a backtrace; a cause that
/// its parent already quotes (many library errors do) is said once.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text.replace('\n', " "));
    }
    line
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn try_main(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.socket.clone();
    match cli.command {
        Command::Run(a) => run(&a, &socket),
        Command::Status(a) => status(&a, &socket),
        Command::Flows(a) => flows(&a, &socket),
        Command::Report(a) => report(&a, &socket),
        Command::Events(a) => events(&a, &socket),
        Command::Remedy(RemedyCommand::Status(a)) => remedy_status(&a, &socket),
        Command::Analyze(a) => analyze(&a),
        Command::Uninstall { pin_path, config } => uninstall(pin_path, config),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "monitor", &mut out);
            emit(&String::from_utf8_lossy(&out))
        }
        Command::Manpage => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .context("rendering the man page")?;
            emit(&String::from_utf8_lossy(&out))
        }
    }
}

/// Write to stdout; a closed pipe comes back as an error that `main` ends quietly on.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

fn emit_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    emit(&(serde_json::to_string_pretty(v)? + "\n"))
}

fn run(a: &RunArgs, socket: &std::path::Path) -> anyhow::Result<()> {
    let cfg = a.effective(socket)?;
    if a.print_config {
        return emit(&toml::to_string(&cfg).context("printing the configuration")?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(monitor::agent::run(cfg))
}

fn status(a: &JsonArg, socket: &std::path::Path) -> anyhow::Result<()> {
    let v = Client::call(socket, &Request::Status)?;
    if a.json {
        return emit_json(&v);
    }
    let s: Status = serde_json::from_value(v).context("reading the agent's status")?;
    emit(&render::status(&s))
}

fn flows(a: &FlowsArgs, socket: &std::path::Path) -> anyhow::Result<()> {
    let v = Client::call(socket, &Request::Flows(a.query()))?;
    let list: FlowList = serde_json::from_value(v).context("reading the agent's flows")?;
    if a.json {
        return emit_json(&list.rows);
    }
    emit(&render::flows(&list))
}

fn report(a: &JsonArg, socket: &std::path::Path) -> anyhow::Result<()> {
    let v = Client::call(socket, &Request::Report)?;
    let r: ReportPayload = serde_json::from_value(v).context("reading the agent's report")?;
    if a.json {
        return emit_json(&r.report);
    }
    emit(&r.text)
}

fn remedy_status(a: &JsonArg, socket: &std::path::Path) -> anyhow::Result<()> {
    let v = Client::call(socket, &Request::Remedy)?;
    if a.json {
        return emit_json(&v);
    }
    let s: monitor_core::remedy::RemedyStatus =
        serde_json::from_value(v).context("reading the agent's remedy status")?;
    emit(&render::remedy(&s))
}

fn events(a: &EventsArgs, socket: &std::path::Path) -> anyhow::Result<()> {
    let mut c = Client::connect(socket)?;
    c.send(&Request::Events { follow: a.follow })?;
    while let Some(v) = c.read_line()? {
        let e: EventPayload = serde_json::from_value(v).context("reading a verdict")?;
        let line = if a.json {
            serde_json::to_string(&e.verdict)?
        } else {
            e.text
        };
        emit(&(line + "\n"))?;
    }
    Ok(())
}

fn analyze(a: &AnalyzeArgs) -> anyhow::Result<()> {
    let opts = a.options()?;
    let analysis = monitor::analyze::analyze(&a.file, &opts)?;
    if a.json {
        return emit_json(&analysis);
    }
    emit(&format!(
        "{}\n\n{}",
        analysis.capture.summary(),
        render::report(&analysis.report)
    ))
}

fn uninstall(
    pin_path: Option<std::path::PathBuf>,
    config: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
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
        emit(&format!("nothing pinned in {}\n", dir.display()))
    } else {
        emit(&format!(
            "removed from {}: {}\n",
            dir.display(),
            removed.join(", ")
        ))
    }
}
