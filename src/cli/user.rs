//! `pinproxy user add NAME`: reads a password and prints the
//! `[[auth.users]]` entry to paste into the configuration, with an argon2id
//! hash of it. The password is read from the terminal without echo (typed
//! twice), or with `--password-stdin` as the first line of standard input
//! (for scripts); it is never a command-line argument, where `ps` and shell
//! history would keep it.

use std::io::{BufRead as _, IsTerminal as _};

use anyhow::{bail, Context as _};

use super::{UserAction, UserArgs};
use crate::config::valid_exit_id;
use crate::proxy::auth::{password, valid_user_name};

/// Runs `pinproxy user ...`.
pub fn user(args: UserArgs) -> anyhow::Result<()> {
    match args.action {
        UserAction::Add {
            name,
            password_stdin,
            exits,
        } => add(&name, password_stdin, &exits),
    }
}

fn add(name: &str, password_stdin: bool, exits: &[String]) -> anyhow::Result<()> {
    if !valid_user_name(name) {
        bail!(
            "user name {name:?}: use 1-64 characters of letters, digits and -._~+=, not starting \
             with \"session-\" nor containing \"-session-\" (clients name sessions as \
             NAME-session-KEY)"
        );
    }
    if let Some(bad) = exits.iter().find(|id| !valid_exit_id(id)) {
        bail!("--exit {bad:?} is not an exit id");
    }
    let password = read_password(name, password_stdin)?;
    if password.is_empty() {
        bail!("the password is empty");
    }
    let hash = password::hash_argon2id(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
    println!("[[auth.users]]\nname = \"{name}\"\npassword_hash = \"{hash}\"");
    if !exits.is_empty() {
        let list: Vec<String> = exits.iter().map(|id| format!("\"{id}\"")).collect();
        println!("exits = [{}]", list.join(", "));
    }
    Ok(())
}

fn read_password(name: &str, from_stdin: bool) -> anyhow::Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_owned());
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "standard input is not a terminal: pass --password-stdin to read the password from it"
        );
    }
    let first = rpassword::prompt_password(format!("Password for {name}: "))
        .context("cannot read the password from the terminal")?;
    let again = rpassword::prompt_password("Again: ")
        .context("cannot read the password from the terminal")?;
    if first != again {
        bail!("the passwords differ");
    }
    Ok(first)
}
