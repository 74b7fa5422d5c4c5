//! Certificates and keys for one control plane, written as PEM files.
//!
//! A cluster CA signs the apiserver's serving certificate (SANs `localhost`,
//! `127.0.0.1` and the in-cluster names) and the admin client certificate
//! (`O=system:masters`); a separate front-proxy CA signs the client
//! certificate the aggregation layer presents to extension apiservers; an
//! ECDSA key pair signs service-account tokens. All keys are ECDSA P-256.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::{Error, Result};

/// Paths of the generated PEM files.
#[derive(Debug, Clone)]
pub struct Pki {
    /// Cluster CA certificate (client CA of the apiserver, root CA of pods).
    pub ca_cert: PathBuf,
    /// Cluster CA key (signs CSRs in the controller-manager).
    pub ca_key: PathBuf,
    /// kube-apiserver serving certificate.
    pub apiserver_cert: PathBuf,
    /// kube-apiserver serving key.
    pub apiserver_key: PathBuf,
    /// Admin client certificate (`CN=hndsr-e2e-admin`, `O=system:masters`).
    pub admin_cert: PathBuf,
    /// Admin client key.
    pub admin_key: PathBuf,
    /// Front-proxy CA certificate (`--requestheader-client-ca-file`).
    pub front_proxy_ca_cert: PathBuf,
    /// Front-proxy client certificate (`CN=front-proxy-client`).
    pub front_proxy_client_cert: PathBuf,
    /// Front-proxy client key.
    pub front_proxy_client_key: PathBuf,
    /// Service-account signing key (PKCS#8).
    pub service_account_key: PathBuf,
    /// Service-account public key.
    pub service_account_pub: PathBuf,
    /// The real node's kubelet client certificate (`CN=system:node:<node>`,
    /// `O=system:nodes`: the Node authorizer's identity of that kubelet).
    pub kubelet_client_cert: PathBuf,
    /// Its key.
    pub kubelet_client_key: PathBuf,
    /// The kubelet's serving certificate (the node's address and name), which
    /// the apiserver verifies with the CA for logs, exec and port-forward.
    pub kubelet_serving_cert: PathBuf,
    /// Its key.
    pub kubelet_serving_key: PathBuf,
    /// The apiserver's client certificate towards kubelets (`O=system:masters`,
    /// authorized by the kubelet's webhook).
    pub apiserver_kubelet_client_cert: PathBuf,
    /// Its key.
    pub apiserver_kubelet_client_key: PathBuf,
    /// kube-proxy's client certificate (`CN=system:kube-proxy`, bound to
    /// `system:node-proxier` by the default RBAC policy).
    pub kube_proxy_cert: PathBuf,
    /// Its key.
    pub kube_proxy_key: PathBuf,
}

/// The identity and addresses of the real node the certificates are for.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The Node's name.
    pub name: String,
    /// The addresses the kubelet serves on (the apiserver dials the first).
    pub addresses: Vec<String>,
}

/// CN of the front-proxy client certificate (`--requestheader-allowed-names`).
pub const FRONT_PROXY_CLIENT_CN: &str = "front-proxy-client";

impl Pki {
    /// Generates every certificate and key into `dir`.
    pub fn generate(dir: &Path, node: &NodeIdentity) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
        let pki = Self {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            apiserver_cert: dir.join("apiserver.crt"),
            apiserver_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            front_proxy_ca_cert: dir.join("front-proxy-ca.crt"),
            front_proxy_client_cert: dir.join("front-proxy-client.crt"),
            front_proxy_client_key: dir.join("front-proxy-client.key"),
            service_account_key: dir.join("sa.key"),
            service_account_pub: dir.join("sa.pub"),
            kubelet_client_cert: dir.join("kubelet-client.crt"),
            kubelet_client_key: dir.join("kubelet-client.key"),
            kubelet_serving_cert: dir.join("kubelet-serving.crt"),
            kubelet_serving_key: dir.join("kubelet-serving.key"),
            apiserver_kubelet_client_cert: dir.join("apiserver-kubelet-client.crt"),
            apiserver_kubelet_client_key: dir.join("apiserver-kubelet-client.key"),
            kube_proxy_cert: dir.join("kube-proxy.crt"),
            kube_proxy_key: dir.join("kube-proxy.key"),
        };

        let ca = new_ca("hndsr-e2e-ca")?;
        write(&pki.ca_cert, &ca.pem())?;
        write(&pki.ca_key, &ca.key().serialize_pem())?;

        // The node's addresses too: with a real node, pods reach the
        // apiserver at the address it advertises.
        let mut apiserver_sans = vec![
            "localhost",
            "127.0.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "10.0.0.1",
        ];
        for address in &node.addresses {
            if !apiserver_sans.contains(&address.as_str()) {
                apiserver_sans.push(address);
            }
        }
        let serving = leaf(
            "kube-apiserver",
            None,
            &apiserver_sans,
            &[ExtendedKeyUsagePurpose::ServerAuth],
            &ca,
        )?;
        write(&pki.apiserver_cert, &serving.0)?;
        write(&pki.apiserver_key, &serving.1)?;

        let admin = leaf(
            "hndsr-e2e-admin",
            Some("system:masters"),
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            &ca,
        )?;
        write(&pki.admin_cert, &admin.0)?;
        write(&pki.admin_key, &admin.1)?;

        let front_proxy_ca = new_ca("hndsr-e2e-front-proxy-ca")?;
        write(&pki.front_proxy_ca_cert, &front_proxy_ca.pem())?;
        let front_proxy = leaf(
            FRONT_PROXY_CLIENT_CN,
            None,
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            &front_proxy_ca,
        )?;
        write(&pki.front_proxy_client_cert, &front_proxy.0)?;
        write(&pki.front_proxy_client_key, &front_proxy.1)?;

        let node_user = format!("system:node:{}", node.name);
        let mut node_sans: Vec<&str> = node.addresses.iter().map(String::as_str).collect();
        node_sans.push(&node.name);
        for (cn, org, sans, usage, cert, key) in [
            (
                node_user.as_str(),
                Some("system:nodes"),
                &[][..],
                ExtendedKeyUsagePurpose::ClientAuth,
                &pki.kubelet_client_cert,
                &pki.kubelet_client_key,
            ),
            (
                node.name.as_str(),
                None,
                &node_sans[..],
                ExtendedKeyUsagePurpose::ServerAuth,
                &pki.kubelet_serving_cert,
                &pki.kubelet_serving_key,
            ),
            (
                "kube-apiserver-kubelet-client",
                Some("system:masters"),
                &[][..],
                ExtendedKeyUsagePurpose::ClientAuth,
                &pki.apiserver_kubelet_client_cert,
                &pki.apiserver_kubelet_client_key,
            ),
            (
                "system:kube-proxy",
                None,
                &[][..],
                ExtendedKeyUsagePurpose::ClientAuth,
                &pki.kube_proxy_cert,
                &pki.kube_proxy_key,
            ),
        ] {
            let pair = leaf(cn, org, sans, &[usage], &ca)?;
            write(cert, &pair.0)?;
            write(key, &pair.1)?;
        }

        let sa = KeyPair::generate().map_err(cert_err("service-account key"))?;
        write(&pki.service_account_key, &sa.serialize_pem())?;
        write(&pki.service_account_pub, &sa.public_key_pem())?;
        Ok(pki)
    }
}

/// Writes `ca.crt`, `tls.crt` and `tls.key` into `dir`: a fresh CA and one
/// certificate for `localhost` / `127.0.0.1` usable as server and client,
/// the mutual-TLS layout KEDA's operator and metrics adapter both read from
/// their `--cert-dir`.
pub fn mutual_tls_dir(dir: &Path, cn: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
    let ca = new_ca(&format!("{cn}-ca"))?;
    write(&dir.join("ca.crt"), &ca.pem())?;
    let (cert, key) = leaf(
        cn,
        None,
        &["localhost", "127.0.0.1"],
        &[
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        &ca,
    )?;
    write(&dir.join("tls.crt"), &cert)?;
    write(&dir.join("tls.key"), &key)
}

fn cert_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> Error {
    move |source| Error::Cert { what, source }
}

fn name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(org) = org {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

fn new_ca(cn: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let key = KeyPair::generate().map_err(cert_err("CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA"))?;
    params.distinguished_name = name(cn, None);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, key).map_err(cert_err("CA certificate"))
}

/// Returns (certificate PEM, key PEM).
fn leaf(
    cn: &str,
    org: Option<&str>,
    sans: &[&str],
    usage: &[ExtendedKeyUsagePurpose],
    ca: &CertifiedIssuer<'static, KeyPair>,
) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(cert_err("leaf key"))?;
    let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
    let mut params = CertificateParams::new(sans).map_err(cert_err("leaf certificate"))?;
    params.distinguished_name = name(cn, org);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = usage.to_vec();
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, ca)
        .map_err(cert_err("leaf certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write(path: &Path, pem: &str) -> Result<()> {
    std::fs::write(path, pem).map_err(Error::io("writing", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_pem_file() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeIdentity {
            name: "n".into(),
            addresses: vec!["127.0.0.1".into()],
        };
        let pki = Pki::generate(dir.path(), &node).unwrap();
        for (path, tag) in [
            (&pki.ca_cert, "CERTIFICATE"),
            (&pki.apiserver_cert, "CERTIFICATE"),
            (&pki.admin_cert, "CERTIFICATE"),
            (&pki.front_proxy_ca_cert, "CERTIFICATE"),
            (&pki.front_proxy_client_cert, "CERTIFICATE"),
            (&pki.ca_key, "PRIVATE KEY"),
            (&pki.apiserver_key, "PRIVATE KEY"),
            (&pki.admin_key, "PRIVATE KEY"),
            (&pki.front_proxy_client_key, "PRIVATE KEY"),
            (&pki.service_account_key, "PRIVATE KEY"),
            (&pki.service_account_pub, "PUBLIC KEY"),
        ] {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(
                text.starts_with(&format!("-----BEGIN {tag}-----")),
                "{}",
                path.display()
            );
        }
    }
}
