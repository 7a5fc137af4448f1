//! A throw-away cluster on loopback for the demo (`scripts/demo`), the
//! integration tests and the benchmarks: a CA generated on the fly, N test
//! API servers with anonymous auth off (like k3s), a node credential, and
//! an apilb.yaml in a private temporary directory.

use std::net::{IpAddr, SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::sync::Arc;

use crate::testapi::{ApiServer, ApiServerOptions, Auth, CertPair, Cluster, Pki, TestApiError};

/// How the lab's check authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabAuth {
    /// `client_cert` with the node's certificate.
    ClientCert,
    /// `bearer` with a token file.
    Bearer,
    /// `none`; the servers allow anonymous requests.
    Anonymous,
}

/// The lab's knobs.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// How many API servers.
    pub masters: usize,
    /// How the check authenticates.
    pub auth: LabAuth,
    /// Preferred frontend port; a free one is used when it is taken.
    pub listen_port: Option<u16>,
    /// Preferred metrics port; a free one is used when it is taken.
    pub metrics_port: Option<u16>,
    /// A cluster: the servers listen on 127.0.0.1…N at one port (as real
    /// masters share 6443) and serve the `default/kubernetes` endpoints.
    pub cluster: Option<ClusterKind>,
}

/// Which endpoints API a lab cluster serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterKind {
    /// discovery.k8s.io/v1 EndpointSlices.
    EndpointSlices,
    /// Only v1 Endpoints (an old cluster).
    EndpointsOnly,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            masters: 3,
            auth: LabAuth::ClientCert,
            listen_port: None,
            metrics_port: None,
            cluster: None,
        }
    }
}

/// The check settings written into the lab's config.
#[derive(Clone, Debug)]
pub struct HealthSettings {
    /// `health.interval`.
    pub interval: String,
    /// `health.timeout`.
    pub timeout: String,
    /// `health.rise`.
    pub rise: u32,
    /// `health.fall`.
    pub fall: u32,
    /// More `health:` keys, each line indented by two spaces (e.g.
    /// `  checker: persistent\n`).
    pub extra: String,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings { interval: "1s".into(), timeout: "1s".into(), rise: 2, fall: 2, extra: String::new() }
    }
}

/// A running lab. Dropping it stops the API servers and removes the files.
pub struct Lab {
    /// The private directory holding the config, PKI and runtime files.
    pub dir: tempfile::TempDir,
    /// The lab's CA.
    pub pki: Pki,
    /// The API servers.
    pub servers: Vec<ApiServer>,
    /// The frontend address in the config.
    pub listen: SocketAddr,
    /// apilb's metrics address in the config.
    pub metrics: SocketAddr,
    /// The bearer token the servers accept.
    pub token: String,
    /// The node's client certificate.
    pub node_cert: CertPair,
    /// How the check authenticates.
    pub auth: LabAuth,
    /// Check settings used by [`Lab::config_yaml`].
    pub health: HealthSettings,
    /// The cluster's endpoints, when the lab is a cluster.
    pub cluster: Option<Arc<Cluster>>,
    /// The servers' certificate.
    serving: CertPair,
    /// Who the servers let in.
    server_auth: Auth,
}

/// 127.0.0.`i`.
pub fn loopback(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, u8::try_from(i).unwrap_or(255)])
}

/// A port free on 127.0.0.1…`n`.
fn shared_port(n: usize) -> std::io::Result<u16> {
    for _ in 0..50 {
        let port = free_port(None)?;
        if (2..=n).all(|i| StdListener::bind(SocketAddr::new(loopback(i), port)).is_ok()) {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no port free on every loopback address"))
}

/// A free TCP port on 127.0.0.1, preferring `preferred`.
pub fn free_port(preferred: Option<u16>) -> std::io::Result<u16> {
    if let Some(p) = preferred
        && StdListener::bind(("127.0.0.1", p)).is_ok()
    {
        return Ok(p);
    }
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Lab {
    /// Generates the PKI, starts the servers and writes apilb.yaml.
    pub async fn start(opts: LabOptions) -> Result<Lab, TestApiError> {
        let dir = tempfile::Builder::new().prefix("apilb-lab-").tempdir()?;
        let pki = Pki::new("apilb lab CA")?;
        let token = format!("lab-token-{}", std::process::id());
        let node_cert = pki.client_cert("system:node:lab-node", &["system:nodes"])?;
        let loopbacks: Vec<String> = (1..=20).map(|i| format!("127.0.0.{i}")).collect();
        let mut sans = vec!["kubernetes", "kubernetes.default", "localhost"];
        sans.extend(loopbacks.iter().map(String::as_str));
        let serving = pki.server_cert("kube-apiserver", &sans)?;
        let auth = Auth {
            anonymous: opts.auth == LabAuth::Anonymous,
            tokens: vec![token.clone()],
            client_ca_pem: Some(pki.ca_pem()),
        };
        // A cluster's masters share a port on 127.0.0.1…N; other labs use
        // any free port on 127.0.0.1.
        let (cluster, port) = match opts.cluster {
            Some(kind) => {
                let port = shared_port(opts.masters.max(8))?;
                let endpoints: Vec<(IpAddr, bool)> =
                    (1..=opts.masters).map(|i| (loopback(i), true)).collect();
                (Some(Cluster::new(port, &endpoints, kind == ClusterKind::EndpointSlices)), port)
            }
            None => (None, 0),
        };
        let mut servers = Vec::with_capacity(opts.masters);
        for i in 1..=opts.masters {
            let ip = if cluster.is_some() { loopback(i) } else { IpAddr::from([127, 0, 0, 1]) };
            servers.push(
                ApiServer::start(ApiServerOptions {
                    name: format!("master-{i}"),
                    cert: serving.clone(),
                    auth: auth.clone(),
                    bind: SocketAddr::new(ip, port),
                    cluster: cluster.clone(),
                })
                .await?,
            );
        }
        // Hold the first port while picking the second, so they differ.
        let listen_port = free_port(opts.listen_port)?;
        let held = StdListener::bind(("127.0.0.1", listen_port))?;
        let metrics_port = free_port(opts.metrics_port)?;
        drop(held);
        let listen = SocketAddr::from(([127, 0, 0, 1], listen_port));
        let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
        let lab = Lab {
            dir,
            pki,
            servers,
            listen,
            metrics,
            token,
            node_cert,
            auth: opts.auth,
            health: HealthSettings::default(),
            cluster,
            serving,
            server_auth: auth,
        };
        lab.write_files()?;
        lab.write_config(&lab.config_yaml(""))?;
        Ok(lab)
    }

    /// A path inside the lab directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.path("apilb.yaml")
    }

    fn write_files(&self) -> std::io::Result<()> {
        let write =
            |name: &str, data: &str| apilb::fsutil::write_atomic(&self.path(name), data.as_bytes(), 0o600);
        write("ca.crt", &self.pki.ca_pem())?;
        write("node.crt", &self.node_cert.cert_pem)?;
        write("node.key", &self.node_cert.key_pem)?;
        write("token", &format!("{}\n", self.token))?;
        // Like k3s's kubeproxy.kubeconfig: paths relative to the file.
        write(
            "kubeconfig",
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://127.0.0.1:6444\n    \
             certificate-authority: ca.crt\nusers:\n- name: node\n  user:\n    client-certificate: node.crt\n    \
             client-key: node.key\ncontexts:\n- name: default\n  context:\n    cluster: local\n    user: node\n\
             current-context: default\n",
        )
    }

    /// The `discovery:` section pointing at the lab's kubeconfig. The lab's
    /// masters are on loopback, which discovery refuses unless a network
    /// inside 127.0.0.0/8 is allowed explicitly: it is, unless `extra`
    /// sets `allowed_cidrs` itself.
    pub fn discovery_yaml(&self, extra: &str) -> String {
        let allow = if extra.contains("allowed_cidrs") { "" } else { "    allowed_cidrs: [127.0.0.0/8]\n" };
        format!(
            "discovery:\n  kubernetes:\n    kubeconfig: {}/kubeconfig\n{allow}{extra}",
            self.dir.path().display()
        )
    }

    /// Starts another API server of the cluster at 127.0.0.`i` (not yet in
    /// its endpoints); returns its index in `servers`.
    pub async fn add_server(&mut self, i: usize) -> Result<usize, TestApiError> {
        let port = self.servers.first().map(|s| s.addr().port()).unwrap_or(0);
        let server = ApiServer::start(ApiServerOptions {
            name: format!("master-{i}"),
            cert: self.serving.clone(),
            auth: self.server_auth.clone(),
            bind: SocketAddr::new(loopback(i), port),
            cluster: self.cluster.clone(),
        })
        .await?;
        self.servers.push(server);
        Ok(self.servers.len() - 1)
    }

    /// Starts another API server of the lab on a listener bound elsewhere
    /// (the benchmarks' network namespace); returns its index in `servers`.
    pub fn add_server_on(&mut self, name: &str, listener: StdListener) -> Result<usize, TestApiError> {
        let server = ApiServer::start_on(
            listener,
            ApiServerOptions {
                name: name.to_owned(),
                cert: self.serving.clone(),
                auth: self.server_auth.clone(),
                bind: SocketAddr::from(([0, 0, 0, 0], 0)),
                cluster: self.cluster.clone(),
            },
        )?;
        self.servers.push(server);
        Ok(self.servers.len() - 1)
    }

    /// The `masters:` entries for the given servers.
    pub fn masters_yaml(&self, servers: &[&ApiServer]) -> String {
        servers.iter().map(|s| format!("  - {{name: {}, address: \"{}\"}}\n", s.name(), s.addr())).collect()
    }

    /// The lab's apilb.yaml, with `extra` YAML appended. The `haproxy:`
    /// section comes last, so indented lines in `extra` extend it.
    pub fn config_yaml(&self, extra: &str) -> String {
        let all: Vec<&ApiServer> = self.servers.iter().collect();
        self.config_yaml_for(&all, extra)
    }

    /// The lab's apilb.yaml over some of its servers.
    pub fn config_yaml_for(&self, servers: &[&ApiServer], extra: &str) -> String {
        let d = self.dir.path().display();
        let auth = match self.auth {
            LabAuth::ClientCert => {
                format!("{{mode: client_cert, cert_file: {d}/node.crt, key_file: {d}/node.key}}")
            }
            LabAuth::Bearer => format!("{{mode: bearer, token_file: {d}/token}}"),
            LabAuth::Anonymous => "{mode: none}".into(),
        };
        let h = &self.health;
        format!(
            "# apilb lab configuration (generated)\n\
             listen: \"{listen}\"\n\
             masters:\n{masters}\
             health:\n  interval: {interval}\n  timeout: {timeout}\n  rise: {rise}\n  fall: {fall}\n{health_extra}\
             \x20 tls: {{ca_file: {d}/ca.crt, server_name: kubernetes}}\n\
             \x20 auth: {auth}\n\
             metrics:\n  listen: \"{metrics}\"\n\
             haproxy:\n  runtime_dir: {d}/run\n  state_dir: {d}/state\n  hard_stop_after: 1m\n{extra}",
            listen = self.listen,
            masters = self.masters_yaml(servers),
            interval = h.interval,
            timeout = h.timeout,
            rise = h.rise,
            fall = h.fall,
            health_extra = h.extra,
            metrics = self.metrics,
        )
    }

    /// Writes the config file atomically.
    pub fn write_config(&self, yaml: &str) -> std::io::Result<()> {
        apilb::fsutil::write_atomic(&self.config_path(), yaml.as_bytes(), 0o600)
    }

    /// TLS for clients of the servers (trusts the lab CA).
    pub fn client_tls(&self) -> Result<Arc<rustls::ClientConfig>, TestApiError> {
        crate::testapi::client_tls(&self.pki.ca_pem(), None)
    }

    /// Kills the HAProxy master the lab's agent runs, if any (cleanup).
    pub fn kill_haproxy(&self) {
        let pidfile = apilb::layout::Paths::under(self.dir.path()).pidfile();
        if let Ok(pid) = std::fs::read_to_string(pidfile)
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}
