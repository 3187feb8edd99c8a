//! `pinproxy ca`: print the path (or PEM) of what clients must trust
//! (creating the CA when missing, constrained to `ca.permitted_domains` if
//! set), trust it in an NSS database, or rotate it.
//!
//! The CA lives in `ca.dir` (`--ca-dir`), by default the data directory. A
//! fleet creates it once (`pinproxy ca --ca-dir DIR`) and gives every
//! replica that directory (a mounted secret): replicas never create a CA in
//! a directory named this way.
//!
//! Rotation is staged (see `mitm::ca`): `ca rotate` adds the next CA and
//! from then on `pinproxy ca` hands out the bundle of both, `ca rotate
//! --finish` promotes the next CA once clients trust the bundle.

use std::path::Path;

use super::{CaAction, CaArgs};
use crate::mitm::ca::{self, CaFiles, CertificateAuthority};
use crate::mitm::nssdb;

/// Runs `pinproxy ca ...`.
pub fn ca(args: CaArgs) -> anyhow::Result<()> {
    let mut config = args.common.load()?;
    if !args.permitted_domains.is_empty() {
        config.ca.permitted_domains = args.permitted_domains.clone();
    }
    let dir = match &config.ca.dir {
        Some(dir) => dir.clone(),
        None => config.resolved_data_dir()?,
    };
    let domains = ca::permitted_domains(&config.ca.permitted_domains)?;
    match args.action {
        Some(CaAction::Rotate { finish: true }) => return finish(&dir),
        Some(CaAction::Rotate { finish: false }) => return rotate(&dir, &domains),
        _ => {}
    }
    let current = CertificateAuthority::open(&dir, true, &domains)?;
    let next = CertificateAuthority::load_next(&dir)?;
    if let Some(CaAction::Install { nssdb }) = args.action {
        let files = CaFiles::in_dir(&dir);
        let mut trusted = vec![(files.cert, &current)];
        trusted.extend(next.as_ref().map(|next| (files.next, next)));
        for (path, ca) in trusted {
            let installed = nssdb::install(&path, ca.cert_der(), &nssdb)?;
            println!(
                "{verb} {db}: trusted {ca} as \"{nick}\" for TLS servers",
                verb = if installed.created {
                    "created"
                } else {
                    "updated"
                },
                db = installed.database,
                ca = path.display(),
                nick = installed.nickname,
            );
        }
        return Ok(());
    }
    let trust = CertificateAuthority::trust_path(&dir);
    if next.is_some() {
        eprintln!(
            "note: a CA rotation is in progress: {} holds the current and the next CA; once \
             every client trusts it, run `pinproxy ca rotate --finish`",
            trust.display()
        );
    }
    if args.pem {
        print!("{}", std::fs::read_to_string(&trust)?);
    } else {
        println!("{}", trust.display());
    }
    Ok(())
}

fn rotate(dir: &Path, domains: &[String]) -> anyhow::Result<()> {
    let rotation = ca::rotate(dir, domains)?;
    println!("{}", rotation.bundle.display());
    eprintln!(
        "started a CA rotation in {dir}:\n  the next CA: {next}\n  both CAs, for clients: \
         {bundle}\npinproxy keeps signing with the current CA, so nothing breaks yet. Give every \
         client the bundle (`pinproxy ca` now prints its path; `pinproxy ca install --nssdb DIR` \
         trusts both), then run `pinproxy ca rotate --finish` and restart pinproxy (every replica \
         that shares {dir}): from then on it signs with the new CA, and clients that still trust \
         only the old one are refused.",
        dir = dir.display(),
        next = rotation.next.display(),
        bundle = rotation.bundle.display(),
    );
    Ok(())
}

fn finish(dir: &Path) -> anyhow::Result<()> {
    let files = CaFiles::in_dir(dir);
    match ca::finish_rotation(dir)? {
        Some(cert) => {
            println!("{}", cert.display());
            eprintln!(
                "finished the CA rotation in {dir}: {cert} is the CA now (the old certificate is \
                 kept as {old}; its key was deleted). Restart pinproxy (every replica that shares \
                 {dir}) to sign with it; then remove the old CA from clients' trust stores.",
                dir = dir.display(),
                cert = cert.display(),
                old = files.old.display(),
            );
        }
        None => {
            println!("{}", files.cert.display());
            eprintln!(
                "no rotation in progress in {}: start one with `pinproxy ca rotate`",
                dir.display()
            );
        }
    }
    Ok(())
}
