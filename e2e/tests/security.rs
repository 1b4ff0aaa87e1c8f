//! NATS security against a real nats-server configured for each mode:
//! user/password, token, NKey, creds (operator mode: operator, account and
//! user JWTs signed here with `nkeys`, `resolver: MEMORY`), TLS with a test CA
//! and mutual TLS. Every key, JWT and certificate is generated at test time
//! (certificates with the `openssl` CLI); nothing secret is checked in.
//!
//! For each mode: the wrong or a missing credential stops the real
//! `medallion-ingest` binary with one error line that names the setting to
//! fix, and the right one lets it land every published message in Bronze
//! (in the mutual-TLS case the whole pipeline runs, to Gold).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use medallion_e2e::{Service, pipeline_vars, read_table, row_count, stop_all};
use medallion_testkit::{NatsServer, eventually};
use nkeys::KeyPair;
use sha2::Digest as _;

const MESSAGES: usize = 200;
const PER_MESSAGE: usize = 5;

fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn message(m: usize) -> Vec<u8> {
    (m * PER_MESSAGE..(m + 1) * PER_MESSAGE)
        .map(|i| {
            format!(
                r#"{{"event_id":"s{i}","ts":"2026-11-29T10:00:00Z","user_id":"u{}","amount":{},"currency":"EUR","country":"FR"}}"#,
                i % 7,
                i % 50 + 1
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

async fn rows(lake: &Path, layer: &str, name: &str) -> usize {
    row_count(&read_table(lake, &format!("{layer}.finance.{name}")).await)
}

/// The binary with these settings must exit with an error whose one line
/// names `setting`; returns that line.
fn refused(nats: &NatsServer, extra: &[(&str, String)], setting: &str) -> String {
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut vars = pipeline_vars(&nats.url(), lake.path(), "MEDALLION_INGEST_ADDR");
    for (k, v) in extra {
        vars.insert(k.to_string(), v.clone());
    }
    let mut s = Service::start("medallion-ingest", &vars, logs.path());
    let status = s
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("ingest kept running with a wrong credential:\n{}", s.logs()));
    assert!(!status.success(), "ingest exited 0:\n{}", s.logs());
    let logs = s.logs();
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.starts_with("medallion-ingest: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line:\n{logs}");
    assert!(
        errors[0].contains(setting),
        "the error names {setting}: {}",
        errors[0]
    );
    errors[0].to_string()
}

/// Ingest (and with `full`, transform and aggregate) run with `extra`; a
/// producer connected with `client` publishes; every message lands once.
async fn lands(
    mode: &str,
    url: &str,
    extra: &[(&str, String)],
    client: async_nats::ConnectOptions,
    full: bool,
) {
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let names: &[&'static str] = if full {
        &[
            "medallion-ingest",
            "medallion-transform",
            "medallion-aggregate",
        ]
    } else {
        &["medallion-ingest"]
    };
    let addrs = [
        "MEDALLION_INGEST_ADDR",
        "MEDALLION_TRANSFORM_ADDR",
        "MEDALLION_AGGREGATE_ADDR",
    ];
    let mut services: Vec<Service> = names
        .iter()
        .zip(addrs)
        .map(|(n, addr)| {
            let mut vars: BTreeMap<String, String> = pipeline_vars(url, lake.path(), addr);
            vars.insert("OTEL_SDK_DISABLED".into(), "true".into());
            for (k, v) in extra {
                vars.insert(k.to_string(), v.clone());
            }
            Service::start(n, &vars, logs.path())
        })
        .collect();
    let started = Instant::now();
    let c = client
        .retry_on_initial_connect()
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("{mode}: test producer cannot connect: {e}"));
    let js = async_nats::jetstream::new(c);
    // The streams exist once ingest has connected and declared them.
    eventually(
        Duration::from_secs(30),
        "ingest declared its stream",
        || {
            let js = js.clone();
            async move { js.get_stream("MEDALLION_INGEST").await.is_ok() }
        },
    )
    .await;
    for m in 0..MESSAGES {
        js.publish("medallion.ingest.finance.payments", message(m).into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let lake_path = lake.path().to_path_buf();
    eventually(Duration::from_secs(60), "bronze has every message", || {
        let l = lake_path.clone();
        async move { rows(&l, "bronze", "payments").await >= MESSAGES }
    })
    .await;
    let bronze = rows(lake.path(), "bronze", "payments").await;
    assert_eq!(bronze, MESSAGES, "{mode}: bronze holds every message once");
    let mut silver = 0;
    if full {
        eventually(Duration::from_secs(60), "silver has every event", || {
            let l = lake_path.clone();
            async move { rows(&l, "silver", "payments").await >= MESSAGES * PER_MESSAGE }
        })
        .await;
        silver = rows(lake.path(), "silver", "payments").await;
        assert_eq!(silver, MESSAGES * PER_MESSAGE, "{mode}: silver");
        eventually(Duration::from_secs(60), "gold is written", || {
            let l = lake_path.clone();
            async move { rows(&l, "gold", "revenue_by_country_hourly").await == 1 }
        })
        .await;
    }
    let layers = if full {
        format!(
            "bronze {bronze}, silver {silver} (expected {MESSAGES}, {})",
            MESSAGES * PER_MESSAGE
        )
    } else {
        format!("bronze {bronze} (expected {MESSAGES}; ingest only)")
    };
    println!(
        "security {mode}: published {MESSAGES} messages ({} events); {layers}; landed in {:.1} s",
        MESSAGES * PER_MESSAGE,
        started.elapsed().as_secs_f64()
    );
    stop_all(&mut services);
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password() {
    let nats = NatsServer::start_with_config(Some(
        r#"authorization { user: medallion, password: "s3cret-pw" }"#,
    ));
    let wrong = refused(
        &nats,
        &[
            ("NATS_USER", "medallion".into()),
            ("NATS_PASSWORD", "wrong".into()),
        ],
        "NATS_USER/NATS_PASSWORD",
    );
    println!("security user/password, wrong password: {wrong}");
    let missing = refused(&nats, &[], "NATS_USER");
    println!("security user/password, none given: {missing}");
    lands(
        "user/password",
        &nats.url(),
        &[
            ("NATS_USER", "medallion".into()),
            ("NATS_PASSWORD", "s3cret-pw".into()),
        ],
        async_nats::ConnectOptions::with_user_and_password("medallion".into(), "s3cret-pw".into()),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token() {
    let nats = NatsServer::start_with_config(Some(r#"authorization { token: "t0k3n-abc" }"#));
    let wrong = refused(&nats, &[("NATS_TOKEN", "nope".into())], "NATS_TOKEN");
    println!("security token, wrong token: {wrong}");
    refused(&nats, &[], "NATS_TOKEN");
    lands(
        "token",
        &nats.url(),
        &[("NATS_TOKEN", "t0k3n-abc".into())],
        async_nats::ConnectOptions::with_token("t0k3n-abc".into()),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey() {
    let user = KeyPair::new_user();
    let stranger = KeyPair::new_user();
    let dir = tempfile::tempdir().unwrap();
    let seed = write(dir.path(), "user.nk", &user.seed().unwrap());
    let other = write(dir.path(), "other.nk", &stranger.seed().unwrap());
    let garbage = write(dir.path(), "garbage.nk", "not a seed");
    let nats = NatsServer::start_with_config(Some(&format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}",
        user.public_key()
    )));
    let wrong = refused(
        &nats,
        &[("NATS_NKEY", other.display().to_string())],
        "NATS_NKEY",
    );
    println!("security nkey, unknown key: {wrong}");
    let bad = refused(
        &nats,
        &[("NATS_NKEY", garbage.display().to_string())],
        "NATS_NKEY",
    );
    println!("security nkey, not a seed: {bad}");
    lands(
        "nkey",
        &nats.url(),
        &[("NATS_NKEY", seed.display().to_string())],
        async_nats::ConnectOptions::with_nkey(user.seed().unwrap()),
        false,
    )
    .await;
}

/// A NATS JWT: `header.claims.signature`, Ed25519-signed by `signer`, with
/// `jti` the base32 SHA-256 of the claims (as nsc issues them).
fn jwt(signer: &KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = serde_json::json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = serde_json::json!({
        "iat": iat,
        "iss": signer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let digest = sha2::Sha256::digest(claims.to_string().as_bytes());
    claims["jti"] = data_encoding::BASE32_NOPAD.encode(&digest).into();
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = signer.sign(signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", b64(&signature))
}

/// An account JWT; `jetstream` gives it unlimited JetStream (the system
/// account must not have any).
fn account_jwt(operator: &KeyPair, account: &KeyPair, name: &str, jetstream: bool) -> String {
    let js = if jetstream { -1 } else { 0 };
    jwt(
        operator,
        &account.public_key(),
        name,
        serde_json::json!({
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": js, "disk_storage": js, "streams": js, "consumer": js,
            },
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account",
            "version": 2,
        }),
    )
}

fn creds(account: &KeyPair, user: &KeyPair) -> String {
    let user_jwt = jwt(
        account,
        &user.public_key(),
        "medallion",
        serde_json::json!({
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        }),
    );
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_in_operator_mode() {
    let operator = KeyPair::new_operator();
    let account = KeyPair::new_account();
    let system = KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "medallion-test-operator",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let nats = NatsServer::start_with_config(Some(&format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {acc}: \"{acc_jwt}\"\n  {sys}: \"{sys_jwt}\"\n}}\n",
        sys = system.public_key(),
        acc = account.public_key(),
        acc_jwt = account_jwt(&operator, &account, "medallion", true),
        sys_jwt = account_jwt(&operator, &system, "SYS", false),
    )));
    let dir = tempfile::tempdir().unwrap();
    let user = KeyPair::new_user();
    let good = write(dir.path(), "medallion.creds", &creds(&account, &user));
    // Signed by an account the server does not know.
    let foreign = write(
        dir.path(),
        "foreign.creds",
        &creds(&KeyPair::new_account(), &KeyPair::new_user()),
    );
    let wrong = refused(
        &nats,
        &[("NATS_CREDS", foreign.display().to_string())],
        "NATS_CREDS",
    );
    println!("security creds, unknown account: {wrong}");
    let garbage = write(dir.path(), "garbage.creds", "no jwt here\n");
    let bad = refused(
        &nats,
        &[("NATS_CREDS", garbage.display().to_string())],
        "NATS_CREDS",
    );
    println!("security creds, not a creds file: {bad}");
    refused(&nats, &[], "NATS_CREDS");
    lands(
        "creds (operator mode)",
        &nats.url(),
        &[("NATS_CREDS", good.display().to_string())],
        async_nats::ConnectOptions::with_credentials_file(&good)
            .await
            .unwrap(),
        false,
    )
    .await;
}

/// A test CA, a server certificate for 127.0.0.1 and a client certificate,
/// made with the `openssl` CLI in `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A second CA that signed nothing the server uses.
    other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("the openssl CLI");
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pki(dir: &Path) -> Pki {
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    for ca in ["ca", "other-ca"] {
        openssl(
            dir,
            &format!(
                "req -x509 {ec} -keyout {ca}.key -out {ca}.pem -days 2 -subj /CN=medallion-test-{ca} \
                 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
            ),
        );
    }
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        ),
        (
            "client",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        ),
    ] {
        write(dir, &format!("{name}.ext"), ext);
        openssl(
            dir,
            &format!("req {ec} -keyout {name}.key -out {name}.csr -subj /CN=medallion-{name}"),
        );
        openssl(
            dir,
            &format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                 -out {name}.pem -days 2 -extfile {name}.ext"
            ),
        );
    }
    Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
        other_ca: dir.join("other-ca.pem"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let nats = NatsServer::start_with_config(Some(&format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  timeout: 5\n}}\n",
        p.server_cert.display().to_string(),
        p.server_key.display().to_string(),
    )));
    let url = format!("tls://127.0.0.1:{}", nats.port());
    let at_tls = |extra: Vec<(&'static str, String)>| {
        let mut v = vec![("NATS_URL", url.clone())];
        v.extend(extra);
        v
    };
    let untrusted = refused(&nats, &at_tls(vec![]), "NATS_CA");
    println!("security tls, no NATS_CA: {untrusted}");
    let wrong = refused(
        &nats,
        &at_tls(vec![("NATS_CA", p.other_ca.display().to_string())]),
        "NATS_CA",
    );
    println!("security tls, another CA: {wrong}");
    lands(
        "tls",
        &url,
        &[("NATS_CA", p.ca.display().to_string())],
        async_nats::ConnectOptions::new()
            .add_root_certificates(p.ca.clone())
            .require_tls(true),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_runs_the_whole_pipeline() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let nats = NatsServer::start_with_config(Some(&format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 5\n}}\n",
        p.server_cert.display().to_string(),
        p.server_key.display().to_string(),
        p.ca.display().to_string(),
    )));
    let url = format!("tls://127.0.0.1:{}", nats.port());
    let no_cert = refused(
        &nats,
        &[
            ("NATS_URL", url.clone()),
            ("NATS_CA", p.ca.display().to_string()),
        ],
        "NATS_CERT",
    );
    println!("security mutual tls, no client certificate: {no_cert}");
    // A client certificate the server's CA did not sign.
    let stranger = tempfile::tempdir().unwrap();
    let q = pki(stranger.path());
    let foreign = refused(
        &nats,
        &[
            ("NATS_URL", url.clone()),
            ("NATS_CA", p.ca.display().to_string()),
            ("NATS_CERT", q.client_cert.display().to_string()),
            ("NATS_KEY", q.client_key.display().to_string()),
        ],
        "NATS_CERT",
    );
    println!("security mutual tls, certificate from another CA: {foreign}");
    lands(
        "mutual tls",
        &url,
        &[
            ("NATS_CA", p.ca.display().to_string()),
            ("NATS_CERT", p.client_cert.display().to_string()),
            ("NATS_KEY", p.client_key.display().to_string()),
        ],
        async_nats::ConnectOptions::new()
            .add_root_certificates(p.ca.clone())
            .add_client_certificate(p.client_cert.clone(), p.client_key.clone())
            .require_tls(true),
        true,
    )
    .await;
}
