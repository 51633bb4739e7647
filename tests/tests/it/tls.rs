//! TLS on the gRPC listener: rustls with a server certificate, optionally requiring client
//! certificates; plaintext only on loopback unless explicitly allowed.

use graft_client::{ConnectOptions, GenerateOptions, GraftClient, TlsOptions};
use graft_server::{config::ServerConfig, server};
use graft_tests::{tiny_model_path, ADMIN_KEY};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = p.self_signed(&key).expect("ca");
        Self {
            ca_pem: ca.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// `(certificate, key)` PEMs for `name`, signed by this CA.
    fn leaf(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .signed_by(&key, &self.issuer)
            .expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write pem");
    p
}

async fn connect(addr: std::net::SocketAddr, tls: TlsOptions) -> Result<GraftClient, String> {
    GraftClient::connect_with(
        &format!("https://{addr}"),
        &ConnectOptions {
            api_key: Some(ADMIN_KEY.into()),
            tls,
        },
    )
    .await
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_serve_and_plaintext_does_not() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = pki.leaf("localhost");
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem);
    let (cert_p, key_p) = (
        write(dir.path(), "server.pem", &cert),
        write(dir.path(), "server.key", &key),
    );
    let tls_for = |ca: &str| TlsOptions {
        ca_pem: Some(ca.as_bytes().to_vec()),
        domain: Some("localhost".into()),
        identity: None,
    };

    // Server TLS only.
    let data = tempfile::tempdir().expect("data");
    let database_url = graft_tests::test_database(data.path()).await;
    let start = |client_ca: Option<std::path::PathBuf>| {
        let mut cfg = ServerConfig::for_model(tiny_model_path(), data.path());
        cfg.database_url = database_url.clone();
        cfg.tenancy.admin_key = Some(ADMIN_KEY.into());
        cfg.tls = Some(graft_server::config::TlsFiles {
            cert: cert_p.clone(),
            key: key_p.clone(),
            client_ca,
        });
        async move {
            let srv = server::start(cfg).await.expect("start");
            srv.ready().await.expect("ready");
            srv
        }
    };
    let srv = start(None).await;
    let admin = connect(srv.grpc_addr, tls_for(&pki.ca_pem))
        .await
        .expect("TLS connect");
    admin.create_tenant("acme").await.expect("tenant over TLS");
    let named = GenerateOptions {
        tenant: Some("acme".into()),
        ..GenerateOptions::greedy(3)
    };
    admin
        .generate(named.prompt("abc"))
        .await
        .expect("generate over TLS");
    // A client that does not trust the CA fails; so does plaintext.
    let other = Pki::new();
    match connect(srv.grpc_addr, tls_for(&other.ca_pem)).await {
        Err(_) => {}
        Ok(c) => assert!(c.generate(named.prompt("abc")).await.is_err()),
    }
    let plain = GraftClient::connect(&format!("http://{}", srv.grpc_addr)).await;
    if let Ok(c) = plain {
        assert!(c.list_adapters("").await.is_err(), "plaintext against TLS");
    }

    // Mutual TLS: a client certificate from the CA is required.
    let (ccert, ckey) = pki.leaf("client");
    srv.drain().await.expect("drain");
    let srv = start(Some(ca.clone())).await;
    let with_identity = TlsOptions {
        identity: Some((ccert.into_bytes(), ckey.into_bytes())),
        ..tls_for(&pki.ca_pem)
    };
    let c = connect(srv.grpc_addr, with_identity)
        .await
        .expect("mTLS connect");
    c.generate(named.prompt("abc"))
        .await
        .expect("generate over mTLS");
    match connect(srv.grpc_addr, tls_for(&pki.ca_pem)).await {
        Err(_) => {}
        Ok(c) => assert!(
            c.generate(named.prompt("abc")).await.is_err(),
            "no client certificate must be refused"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_off_loopback_needs_an_explicit_yes() {
    let data = tempfile::tempdir().expect("data");
    let mut cfg = ServerConfig::for_model(tiny_model_path(), data.path());
    cfg.database_url = graft_tests::test_database(data.path()).await;
    cfg.listen = "0.0.0.0:0".parse().expect("addr");
    let err = server::start(cfg.clone()).await.err().expect("refused");
    assert!(err.to_string().contains("--allow-plaintext"), "{err}");
    cfg.allow_plaintext = true;
    let srv = server::start(cfg).await.expect("explicitly allowed");
    srv.ready().await.expect("ready");
    srv.drain().await.expect("drain");
}

/// An async-openai client over HTTPS trusting `ca_pem`, with a client identity if given.
fn openai_over_tls(
    addr: std::net::SocketAddr,
    key: &str,
    ca_pem: &str,
    identity: Option<(String, String)>,
) -> async_openai::Client<async_openai::config::OpenAIConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca"));
    if let Some((cert, key)) = identity {
        b = b.identity(
            reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).expect("identity"),
        );
    }
    async_openai::Client::with_config(
        async_openai::config::OpenAIConfig::new()
            .with_api_base(format!("https://localhost:{}/v1", addr.port()))
            .with_api_key(key),
    )
    .with_http_client(b.build().expect("http client"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_front_serves_tls_and_mutual_tls_with_grpcs_certificate() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = pki.leaf("localhost");
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem);
    let (cert_p, key_p) = (
        write(dir.path(), "server.pem", &cert),
        write(dir.path(), "server.key", &key),
    );
    let data = tempfile::tempdir().expect("data");
    let database_url = graft_tests::test_database(data.path()).await;
    let start = |client_ca: Option<std::path::PathBuf>| {
        let mut cfg = ServerConfig::for_model(tiny_model_path(), data.path());
        cfg.database_url = database_url.clone();
        cfg.tenancy.admin_key = Some(ADMIN_KEY.into());
        cfg.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
        cfg.tls = Some(graft_server::config::TlsFiles {
            cert: cert_p.clone(),
            key: key_p.clone(),
            client_ca,
        });
        async move {
            let srv = server::start(cfg).await.expect("start");
            srv.ready().await.expect("ready");
            srv
        }
    };
    let srv = start(None).await;
    let tls = TlsOptions {
        ca_pem: Some(pki.ca_pem.as_bytes().to_vec()),
        domain: Some("localhost".into()),
        identity: None,
    };
    let admin = connect(srv.grpc_addr, tls.clone()).await.expect("gRPC");
    admin.create_tenant("acme").await.expect("tenant");
    let key = admin.create_key("acme", "http").await.expect("key");
    let http = srv.http_addr.expect("HTTP front");
    let models = openai_over_tls(http, &key, &pki.ca_pem, None)
        .models()
        .list()
        .await
        .expect("models over HTTPS");
    assert_eq!(models.data.len(), 1);
    // A client that does not trust the CA fails; so does plaintext HTTP.
    let other = Pki::new();
    assert!(openai_over_tls(http, &key, &other.ca_pem, None)
        .models()
        .list()
        .await
        .is_err());
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(http).await.expect("connect");
        s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(!out.starts_with(b"HTTP/1.1 200"), "plaintext answered");
    }
    // Mutual TLS: a client certificate from the CA is required.
    srv.drain().await.expect("drain");
    let srv = start(Some(ca)).await;
    let http = srv.http_addr.expect("HTTP front");
    let id = pki.leaf("client");
    openai_over_tls(http, &key, &pki.ca_pem, Some(id))
        .models()
        .list()
        .await
        .expect("mTLS");
    assert!(
        openai_over_tls(http, &key, &pki.ca_pem, None)
            .models()
            .list()
            .await
            .is_err(),
        "no client certificate must be refused"
    );
}
