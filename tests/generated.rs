//! The shell completions in `completions/` and the man page `man/singleflight.1`, generated
//! from the clap definition and committed. This test fails when they are stale;
//! `SINGLEFLIGHT_REGENERATE=1 cargo test --test tests generated::` rewrites them.

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
         {REGENERATE}=1 cargo test --test tests generated::\nand commit the result",
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

/// Every relative link in the README and `docs/` names a file that exists, and an
/// anchor names a heading of it (GitHub's slugs). Links to the web are not followed.
#[test]
fn every_relative_link_in_the_readme_and_docs_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md"), root.join("CHANGELOG.md")];
    let docs = fs::read_dir(root.join("docs")).expect("docs/");
    pages.extend(
        docs.flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "md")),
    );
    let mut broken = Vec::new();
    for page in &pages {
        let text = fs::read_to_string(page).expect("a page");
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let file = match file {
                "" => page.clone(),
                file => page.parent().expect("a dir").join(file),
            };
            let shown = format!(
                "{}: ({target})",
                page.strip_prefix(root).unwrap_or(page).display()
            );
            if !file.exists() {
                broken.push(format!("{shown}: no such file"));
            } else if !anchor.is_empty() && file.extension().is_some_and(|x| x == "md") {
                let headings = slugs(&fs::read_to_string(&file).expect("the target"));
                if !headings.iter().any(|h| h == anchor) {
                    broken.push(format!("{shown}: no heading #{anchor}"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The targets of `[text](target)` links outside code blocks and code spans.
fn links(markdown: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Code spans hold examples, not links.
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            found.push(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    found
}

/// The anchors GitHub gives a page's headings: lower case, spaces to `-`, and
/// anything but letters, digits, `-` and `_` dropped; a repeated one gets `-1`, `-2`.
fn slugs(markdown: &str) -> Vec<String> {
    let (mut seen, mut bases): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let Some(title) = line.strip_prefix('#').filter(|_| !fenced) else {
            continue;
        };
        let title = title.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let n = bases.iter().filter(|s| **s == slug).count();
        seen.push(if n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        bases.push(slug);
    }
    seen
}
