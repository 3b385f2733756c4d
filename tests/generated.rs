//! The shell completions in `completions/` and the man page `man/singleflight.1`, generated
//! from the clap definition and committed. This test fails when they are stale;
//! `SINGLEFLIGHT_REGENERATE=1 cargo test --test generated` rewrites them.

use std::fs;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use singleflight::Cli;
use singleflight::exit::Status;

#[path = "../man/page.rs"]
mod page;
use page::man_page;

const REGENERATE: &str = "SINGLEFLIGHT_REGENERATE";

/// Every generated file: its path in the repository and its contents.
fn generated() -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for (shell, file) in [
        (Shell::Bash, "singleflight.bash"),
        (Shell::Zsh, "_singleflight"),
        (Shell::Fish, "singleflight.fish"),
        (Shell::Elvish, "singleflight.elv"),
        (Shell::PowerShell, "_singleflight.ps1"),
    ] {
        let mut bytes = Vec::new();
        clap_complete::generate(
            shell,
            &mut public(Cli::command()),
            "singleflight",
            &mut bytes,
        );
        files.push((Path::new("completions").join(file), bytes));
    }
    files.push((Path::new("man").join("singleflight.1"), man_page()));
    files
}

/// The command without its hidden (internal) options, which clap_complete would offer:
/// the same name, texts, options and verbs, rebuilt without the hidden ones.
fn public(command: clap::Command) -> clap::Command {
    let args: Vec<clap::Arg> = command
        .get_arguments()
        .filter(|arg| !arg.is_hide_set())
        .cloned()
        .collect();
    let verbs: Vec<clap::Command> = command.get_subcommands().cloned().map(public).collect();
    // Leaked: clap wants 'static names without its `string` feature; a test can afford it.
    let name: &'static str = String::leak(command.get_name().to_owned());
    let mut public = clap::Command::new(name)
        .args(args)
        .subcommands(verbs)
        .args_conflicts_with_subcommands(command.is_args_conflicts_with_subcommands_set())
        .subcommand_negates_reqs(command.is_subcommand_negates_reqs_set());
    if let Some(about) = command.get_about() {
        public = public.about(about.clone());
    }
    if let Some(version) = command.get_version() {
        public = public.version(String::leak(version.to_owned()) as &str);
    }
    public
}

#[test]
fn completions_and_man_page_are_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let regenerate = std::env::var_os(REGENERATE).is_some_and(|v| !v.is_empty() && v != "0");
    let mut stale = Vec::new();
    for (path, bytes) in generated() {
        let full = root.join(&path);
        if fs::read(&full).ok().as_deref() == Some(&bytes[..]) {
            continue;
        }
        if regenerate {
            fs::create_dir_all(full.parent().expect("a file in a folder")).expect("mkdir");
            fs::write(&full, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", full.display()));
            eprintln!("regenerated {}", path.display());
        } else {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale generated files: {}\nthe clap definition changed; regenerate them with\n  \
         {REGENERATE}=1 cargo test --test generated\nand commit the result",
        stale.join(", ")
    );
}

#[test]
fn the_man_page_has_what_a_reader_looks_for() {
    let page = String::from_utf8(man_page()).expect("utf-8");
    for needed in [
        ".SH OPTIONS",
        ".SH \"EXIT STATUS\"",
        ".SH FILES",
        ".SH ENVIRONMENT",
        ".SH EXAMPLES",
        "SINGLEFLIGHT_CACHE_DIR",
        "SINGLEFLIGHT_BACKEND",
        "SINGLEFLIGHT_FENCING_TOKEN",
        "XDG_CACHE_HOME",
        "Library/Caches",
        "LOCALAPPDATA",
        "\\-\\-kill\\-after",
        "124",
    ] {
        assert!(page.contains(needed), "the man page lacks {needed:?}");
    }
    // Internal options stay out of the page.
    assert!(
        !page.contains("refresher"),
        "the man page shows --refresher"
    );
}

#[test]
fn completions_offer_the_options_and_verbs() {
    for (path, bytes) in generated() {
        if !path.starts_with("completions") {
            continue;
        }
        let text = String::from_utf8(bytes).expect("utf-8");
        for word in ["--ttl", "--background", "--cache-dir", "status", "clear"] {
            let word = word.trim_start_matches('-');
            assert!(text.contains(word), "{} lacks {word}", path.display());
        }
        assert!(
            !text.contains("refresher"),
            "{} offers --refresher",
            path.display()
        );
    }
}

/// The labels of a markdown table's first column in the section that starts with
/// `heading`, header row left out.
fn first_column(markdown: &str, heading: &str) -> Vec<String> {
    let section = markdown
        .split_once(heading)
        .unwrap_or_else(|| panic!("no {heading:?}"))
        .1;
    section
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2)
        .map(|row| row.split('|').nth(1).unwrap_or("").trim().to_owned())
        .collect()
}

#[test]
fn the_exit_tables_of_the_readme_and_the_man_page_are_the_status_enum() {
    let labels: Vec<String> = Status::ALL.iter().map(|s| s.label()).collect();
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    assert_eq!(
        first_column(&readme, "\n## Exit status\n"),
        labels,
        "README.md"
    );
    let page = String::from_utf8(man_page()).expect("utf-8");
    let section = page
        .split_once(".SH \"EXIT STATUS\"")
        .and_then(|(_, rest)| rest.split_once("\n.SH "))
        .expect("an EXIT STATUS section")
        .0;
    let tags: Vec<String> = section
        .split(".TP\n")
        .skip(1)
        .map(|item| {
            let tag = item.lines().next().unwrap_or("");
            tag.trim_start_matches("\\fB")
                .trim_end_matches("\\fR")
                .to_owned()
        })
        .collect();
    // The man page says the result's own status in its opening sentence.
    assert_eq!(tags, labels[1..], "the man page");
}
