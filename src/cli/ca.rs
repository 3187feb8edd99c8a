//! `pinproxy ca`: print the CA certificate's path or PEM (creating the CA
//! when missing), or trust it in an NSS database.

use super::{CaAction, CaArgs};
use crate::daemon;
use crate::mitm::ca::CertificateAuthority;
use crate::mitm::nssdb;

/// Runs `pinproxy ca ...`.
pub fn ca(args: CaArgs) -> anyhow::Result<()> {
    let config = args.common.load()?;
    let data_dir = config.resolved_data_dir()?;
    let ca = daemon::prepare_data_dir(&data_dir)?;
    let ca_path = CertificateAuthority::cert_path(&data_dir);
    if let Some(CaAction::Install { nssdb }) = args.action {
        let installed = nssdb::install(&ca_path, ca.cert_der(), &nssdb)?;
        println!(
            "{verb} {db}: trusted {ca} as \"{nick}\" for TLS servers",
            verb = if installed.created {
                "created"
            } else {
                "updated"
            },
            db = installed.database,
            ca = ca_path.display(),
            nick = installed.nickname,
        );
        return Ok(());
    }
    if args.pem {
        print!("{}", ca.cert_pem());
    } else {
        println!("{}", ca_path.display());
    }
    Ok(())
}
