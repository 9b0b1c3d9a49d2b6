//! Certificates for the TLS and permission tests, made up with rcgen: a CA, server certificates
//! for 127.0.0.1 and localhost, client certificates by common name, expired ones. Written as PEM
//! files (keys private, as the broker demands) in a directory of the test.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use std::path::{Path, PathBuf};

/// A certificate authority whose certificates are written under `dir`.
pub struct Ca {
    pub dir: PathBuf,
    pub name: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate (PEM): what a peer must trust.
    pub pem: String,
}

/// A certificate and its key, as files.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes `text` to `path`, readable by its owner only.
pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write a PEM file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

impl Ca {
    /// A new CA named `name`; its certificate is written to `dir/NAME-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signed CA");
        let pem = cert.pem();
        std::fs::write(dir.join(format!("{name}-ca.pem")), &pem).expect("write the CA");
        Ca { dir: dir.to_path_buf(), name: name.to_string(), issuer: Issuer::new(params, key), pem }
    }

    /// Where the CA's certificate is.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A certificate with common name `cn`, for 127.0.0.1 and localhost, valid now unless
    /// `expired`; written to `dir/FILE.pem` and `dir/FILE.key`.
    pub fn issue(&self, file: &str, cn: &str, expired: bool) -> Issued {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        params.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        params.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        let issued =
            Issued { cert: self.dir.join(format!("{file}.pem")), key: self.dir.join(format!("{file}.key")) };
        std::fs::write(&issued.cert, cert.pem()).expect("write the certificate");
        write_private(&issued.key, &key.serialize_pem());
        issued
    }
}
