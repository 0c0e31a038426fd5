//! `allot completions SHELL` and `allot man`: shell completions and a man page, both
//! generated from the command line's own definition so they never drift from it.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;

/// Flags of `allot completions`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Load them, e.g. for bash:
  source <(allot completions bash)
or install: allot completions bash > /usr/share/bash-completion/completions/allot
            allot completions zsh  > /usr/share/zsh/site-functions/_allot
            allot completions fish > /usr/share/fish/vendor_completions.d/allot.fish")]
pub struct CompletionsArgs {
    /// The shell to write completions for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// Writes the completion script for `args.shell` to standard output.
pub fn completions(args: CompletionsArgs, mut command: clap::Command) -> anyhow::Result<ExitCode> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "allot", &mut script);
    write_out(&script, "the completions")
}

/// Flags of `allot man`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Read it with: allot man | man -l -
or install: allot man > /usr/share/man/man1/allot.1")]
pub struct ManArgs {}

/// Writes the man page (roff, section 1) to standard output: the command, its global
/// flags, and a section per subcommand with its flags.
pub fn man(_args: ManArgs, command: clap::Command) -> anyhow::Result<ExitCode> {
    let mut page = Vec::new();
    let command = command.version(crate::VERSION);
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .context("rendering the man page")?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("allot {}", sub.get_name());
        let man = clap_mangen::Man::new(sub.clone().bin_name(&name).display_name(&name));
        let mut text = Vec::new();
        man.render_synopsis_section(&mut text)
            .and_then(|()| man.render_description_section(&mut text))
            .and_then(|()| man.render_options_section(&mut text))
            .and_then(|()| man.render_subcommands_section(&mut text))
            .context("rendering the man page")?;
        writeln!(page, ".SH \"{}\"", name.to_uppercase()).context("rendering the man page")?;
        page.extend(sub_sections(&text));
    }
    write_out(&page, "the man page")
}

/// A sub-page's own `.SH` headers become `.SS` under the subcommand's section.
fn sub_sections(roff: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(roff);
    let mut out = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(".SH ") {
            out += &format!(".SS {rest}\n");
        } else {
            out += line;
            out.push('\n');
        }
    }
    out.into_bytes()
}

/// Writes `bytes` to standard output; a reader that went away (`| head`) is not an error.
fn write_out(bytes: &[u8], what: &str) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).with_context(|| format!("writing {what}"))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}
