//! One way for tests to get a cluster: the real control plane when `KUBEBUILDER_ASSETS` names a
//! folder with `etcd` and `kube-apiserver` (as controller-runtime's envtest starts them), the
//! in-process [`FakeApiServer`] otherwise. Either way: an admin [`kube::Client`] and a kubeconfig
//! file, all stopped and removed on drop.
//!
//! The real path is written after envtest's `pkg/internal/testing/controlplane` (temporary data
//! directory, free ports, a serving certificate from a throw-away CA, a service-account key
//! pair, an admin user, waiting for `/readyz`), with two differences: the certificates and keys
//! come from the `openssl` command, and the admin user authenticates with a static token
//! (`--token-auth-file`, group `system:masters`) rather than a client certificate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::FakeApiServer;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
    #[error("{what}: {source}")]
    Kube {
        what: String,
        source: Box<kube::Error>,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// A directory removed with everything in it on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, ClusterError> {
        let path = std::env::temp_dir().join(format!(
            "coalmine-kube-{}-{:x}",
            std::process::id(),
            crate::clock::random_u64()
        ));
        std::fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop.
struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Backend {
    Fake(FakeApiServer),
    // Fields held for their drop order: the API server stops before etcd.
    Real { _apiserver: Process, _etcd: Process },
}

/// A running API server with an admin client; stops on drop. Fields drop in order: the client,
/// the servers, then the temporary directory.
pub struct TestCluster {
    client: kube::Client,
    kubeconfig: PathBuf,
    backend: Backend,
    _dir: TempDir,
}

impl TestCluster {
    /// The real control plane if `KUBEBUILDER_ASSETS` is set, else the fake.
    pub async fn start() -> Result<Self, ClusterError> {
        match std::env::var_os("KUBEBUILDER_ASSETS") {
            Some(assets) if !assets.is_empty() => Self::start_real(Path::new(&assets)).await,
            _ => Self::start_fake().await,
        }
    }

    /// Always the fake, whatever the environment says.
    pub async fn start_fake() -> Result<Self, ClusterError> {
        let dir = TempDir::new()?;
        let server = FakeApiServer::start()
            .await
            .map_err(io("starting the fake API server"))?;
        let kubeconfig = dir.0.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &server.url(), None, "fake-admin-token")?;
        let client = client_for(&kubeconfig).await?;
        Ok(Self {
            client,
            kubeconfig,
            backend: Backend::Fake(server),
            _dir: dir,
        })
    }

    /// A client with admin rights.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Creates a namespace (tests put their objects in one of their own).
    pub async fn create_namespace(&self, name: &str) -> Result<(), ClusterError> {
        let namespace: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(serde_json::json!({ "metadata": { "name": name } }))
                .expect("a namespace object");
        Api::all(self.client.clone())
            .create(&kube::api::PostParams::default(), &namespace)
            .await
            .map(|_| ())
            .map_err(|source| ClusterError::Kube {
                what: format!("creating namespace {name}"),
                source: Box::new(source),
            })
    }

    /// Another admin client of its own (its own connections), e.g. for a second contender.
    pub async fn new_client(&self) -> Result<kube::Client, ClusterError> {
        client_for(&self.kubeconfig).await
    }

    /// A kubeconfig file for the admin user (for `--kubeconfig` or `KUBECONFIG`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn is_real(&self) -> bool {
        matches!(self.backend, Backend::Real { .. })
    }

    /// The fake, for its test hooks ([`FakeApiServer::compact`]); `None` against a real server.
    pub fn fake(&self) -> Option<&FakeApiServer> {
        match &self.backend {
            Backend::Fake(server) => Some(server),
            Backend::Real { .. } => None,
        }
    }

    async fn start_real(assets: &Path) -> Result<Self, ClusterError> {
        let dir = TempDir::new()?;
        let at = |name: &str| dir.0.join(name);
        let binary = |name: &str| {
            let path = assets.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ClusterError::Failed(format!(
                    "KUBEBUILDER_ASSETS is set but {} does not exist",
                    path.display()
                )))
            }
        };
        let (etcd_bin, apiserver_bin) = (binary("etcd")?, binary("kube-apiserver")?);

        // Certificates: a CA, a serving certificate for 127.0.0.1 signed by it, and the
        // service-account signing key pair.
        let openssl = |args: &[&str]| run("openssl", args, &dir.0);
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=coalmine-test-ca",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "apiserver.key",
            "-out",
            "apiserver.csr",
            "-subj",
            "/CN=kube-apiserver",
        ])?;
        std::fs::write(at("san.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
            .map_err(io("writing san.cnf"))?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "apiserver.crt",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
        ])?;
        openssl(&["genrsa", "-out", "sa.key", "2048"])?;
        openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        let token = format!(
            "{:016x}{:016x}",
            crate::clock::random_u64(),
            crate::clock::random_u64()
        );
        std::fs::write(
            at("tokens.csv"),
            format!("{token},admin,admin,system:masters\n"),
        )
        .map_err(io("writing tokens.csv"))?;

        let (etcd_client, etcd_peer, secure) = (free_port()?, free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        std::fs::create_dir_all(at("etcd")).map_err(io("creating the etcd data directory"))?;
        let etcd = spawn(
            &etcd_bin,
            &[
                format!("--data-dir={}", at("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync=true".into(),
            ],
            &at("etcd.log"),
        )?;
        let apiserver = spawn(
            &apiserver_bin,
            &[
                format!("--etcd-servers={etcd_url}"),
                "--advertise-address=127.0.0.1".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={secure}"),
                format!("--tls-cert-file={}", at("apiserver.crt").display()),
                format!("--tls-private-key-file={}", at("apiserver.key").display()),
                format!("--client-ca-file={}", at("ca.crt").display()),
                format!("--token-auth-file={}", at("tokens.csv").display()),
                format!("--service-account-key-file={}", at("sa.pub").display()),
                format!(
                    "--service-account-signing-key-file={}",
                    at("sa.key").display()
                ),
                format!("--service-account-issuer=https://127.0.0.1:{secure}/"),
                format!(
                    "--service-cluster-ip-range={}",
                    crate::builtins::SERVICE_CIDR
                ),
                "--allow-privileged=true".into(),
                "--authorization-mode=RBAC".into(),
                // No controller manager issues service-account tokens (envtest does the same).
                "--disable-admission-plugins=ServiceAccount".into(),
                format!("--cert-dir={}", dir.0.display()),
            ],
            &at("apiserver.log"),
        )?;
        let kubeconfig = at("kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &format!("https://127.0.0.1:{secure}"),
            Some(&at("ca.crt")),
            &token,
        )?;

        let deadline = Instant::now() + Duration::from_secs(60);
        let client = loop {
            let ready = match client_for(&kubeconfig).await {
                Ok(client) => {
                    let request = http::Request::get("/readyz")
                        .body(Vec::new())
                        .expect("valid");
                    match client.request_text(request).await {
                        Ok(body) if body.trim() == "ok" => Some(client),
                        _ => None,
                    }
                }
                Err(_) => None,
            };
            if let Some(client) = ready {
                break client;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(at("apiserver.log")).unwrap_or_default();
                let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
                return Err(ClusterError::Failed(format!(
                    "kube-apiserver was not ready within 60 s; the end of its log:\n{tail}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        Ok(Self {
            client,
            kubeconfig,
            backend: Backend::Real {
                _apiserver: apiserver,
                _etcd: etcd,
            },
            _dir: dir,
        })
    }
}

fn free_port() -> Result<u16, ClusterError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port())
}

fn run(program: &str, args: &[&str], dir: &Path) -> Result<(), ClusterError> {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {program}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(ClusterError::Failed(format!(
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Process, ClusterError> {
    let log_file = std::fs::File::create(log).map_err(io(format!("creating {}", log.display())))?;
    let err_file = log_file.try_clone().map_err(io("opening a log"))?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file)
        .spawn()
        .map_err(io(format!("starting {}", program.display())))?;
    Ok(Process { child })
}

/// A kubeconfig (JSON, which is YAML) with one cluster, one admin user and its context.
fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: Option<&Path>,
    token: &str,
) -> Result<(), ClusterError> {
    let mut cluster = serde_json::json!({"server": server});
    if let Some(ca) = ca {
        cluster["certificate-authority"] = ca.display().to_string().into();
    }
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin", "namespace": "default"}}],
        "current-context": "test",
    });
    let text = serde_json::to_string_pretty(&config).expect("JSON");
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

async fn client_for(kubeconfig: &Path) -> Result<kube::Client, ClusterError> {
    let kube_err = |what: &str| {
        let what = what.to_owned();
        move |source| ClusterError::Kube {
            what,
            source: Box::new(source),
        }
    };
    let config = Kubeconfig::read_from(kubeconfig)
        .map_err(|e| ClusterError::Failed(format!("reading {}: {e}", kubeconfig.display())))?;
    let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .map_err(|e| ClusterError::Failed(format!("loading {}: {e}", kubeconfig.display())))?;
    kube::Client::try_from(config).map_err(kube_err("building a client"))
}

/// Server-side applies every CustomResourceDefinition in `yaml` (other documents are skipped)
/// and waits until each is `Established`; returns their names.
pub async fn install_crds(client: &kube::Client, yaml: &str) -> Result<Vec<String>, ClusterError> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml)
        .map_err(|e| ClusterError::Failed(format!("the CRD YAML does not parse: {e}")))?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("coalmine-test").force();
    let mut names = Vec::new();
    for doc in docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
    {
        let name = doc["metadata"]["name"]
            .as_str()
            .ok_or_else(|| ClusterError::Failed("a CRD without metadata.name".into()))?;
        api.patch(name, &params, &Patch::Apply(doc))
            .await
            .map_err(|source| ClusterError::Kube {
                what: format!("applying CRD {name}"),
                source: Box::new(source),
            })?;
        names.push(name.to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in &names {
        loop {
            let crd = api.get(name).await.map_err(|source| ClusterError::Kube {
                what: format!("reading CRD {name}"),
                source: Box::new(source),
            })?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Failed(format!(
                    "CRD {name} was not Established within 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(names)
}
