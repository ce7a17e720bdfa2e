//! Command-line interface: one clap parser for the binary and its multi-call names.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

pub const DEFAULT_ETCD_CONFIG: &str = "/var/snap/etcd/common/etcd.conf.yml";
pub const DEFAULT_TARGET: &str = "/home/ubuntu/etcd-snapshots";

/// When `follow` takes a new full snapshot unless told otherwise (`--full-every`).
pub const FULL_EVERY_DEFAULT: &str = "1h,128MiB";
/// Keys an import may touch (add, change or delete) unless `max-keys` is raised: a whole
/// Kubernetes namespace fits, a mistyped prefix that would rewrite the cluster does not.
pub const IMPORT_MAX_KEYS: i64 = 10_000;
pub const DEFAULT_STOP: &str = "systemctl stop snap.etcd.etcd";
pub const DEFAULT_START: &str = "systemctl start snap.etcd.etcd";

/// Snapshot and restore etcd for a Juju charm, or standalone from a shell.
///
/// Invoked as `snapshot` or `restore` (the charm's `actions/<name>` links), it runs that
/// action. With JUJU_ACTION_NAME set it talks to Juju through the hook tools; otherwise it
/// takes flags and prints the results as YAML.
#[derive(Debug, Parser)]
#[command(name = "etcd-actions", version, propagate_version = true)]
pub struct Arguments {
    #[command(flatten)]
    pub settings: SettingArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// How to reach etcd: every command uses it. Each setting has an environment variable.
#[derive(Debug, Clone, Args)]
pub struct SettingArgs {
    /// etcd's own YAML config file (as given to `etcd --config-file`), or a kubeadm static-pod
    /// manifest (`/etc/kubernetes/manifests/etcd.yaml`): recognized by its content.
    #[arg(long, global = true, env = "ETCD_ACTIONS_ETCD_CONFIG", default_value = DEFAULT_ETCD_CONFIG)]
    pub etcd_config: PathBuf,

    /// etcd client URL to snapshot, as etcdctl takes it (one member; `http://` unless TLS
    /// files are given). Overrides the config's; with no config file, a snapshot needs only
    /// this.
    #[arg(long, global = true, env = "ETCDCTL_ENDPOINTS")]
    pub endpoints: Option<String>,

    /// CA certificate of etcd's client port (etcdctl's --cacert).
    #[arg(long, global = true, env = "ETCDCTL_CACERT")]
    pub cacert: Option<PathBuf>,

    /// Client certificate (etcdctl's --cert).
    #[arg(long, global = true, env = "ETCDCTL_CERT")]
    pub cert: Option<PathBuf>,

    /// Client certificate's key (etcdctl's --key).
    #[arg(long, global = true, env = "ETCDCTL_KEY")]
    pub key: Option<PathBuf>,

    /// Seconds to wait for another run's lock before giving up.
    #[arg(
        long,
        global = true,
        env = "ETCD_ACTIONS_LOCK_TIMEOUT",
        default_value_t = 600
    )]
    pub lock_timeout: u64,

    /// Directory of the Prometheus textfile (`etcd_backup.prom`) written after every run;
    /// default node_exporter's `/var/lib/prometheus/node-exporter` when it exists.
    #[arg(long, global = true, env = "ETCD_ACTIONS_METRICS_DIR")]
    pub metrics_dir: Option<PathBuf>,
}

/// Stopping and starting etcd's service (restore; a snapshot's crash recovery reads them from
/// the environment).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Service control")]
pub struct ServiceArgs {
    /// Shell command that stops the etcd service.
    #[arg(long, env = "ETCD_ACTIONS_STOP_COMMAND", default_value = DEFAULT_STOP)]
    pub stop_command: String,

    /// Shell command that starts the etcd service.
    #[arg(long, env = "ETCD_ACTIONS_START_COMMAND", default_value = DEFAULT_START)]
    pub start_command: String,

    /// Seconds to wait for etcd to become healthy after a start.
    #[arg(long, env = "ETCD_ACTIONS_START_TIMEOUT", default_value_t = 120)]
    pub start_timeout: u64,

    /// Seconds the stop or start command may run before its process group is killed.
    #[arg(long, env = "ETCD_ACTIONS_SERVICE_TIMEOUT", default_value_t = 300)]
    pub service_timeout: u64,
}

/// etcd's offline tools (restore and verify).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "etcd tools")]
pub struct ToolArgs {
    /// etcdctl binary; found on PATH when unset (only etcd 3.4's restore tool).
    #[arg(long, env = "ETCD_ACTIONS_ETCDCTL")]
    pub etcdctl: Option<PathBuf>,

    /// etcdutl binary (etcd >= 3.5); found on PATH when unset, optional.
    #[arg(long, env = "ETCD_ACTIONS_ETCDUTL")]
    pub etcdutl: Option<PathBuf>,

    /// Revisions to add on restore (with --mark-compacted) where the restore tool supports it,
    /// so that watchers never see revisions go backwards. 0 disables.
    #[arg(
        long,
        env = "ETCD_ACTIONS_BUMP_REVISION",
        default_value_t = 1_000_000_000
    )]
    pub bump_revision: u64,
}

/// The object store (S3) archives also go to, standalone; in Juju the `s3` relation.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Object store")]
pub struct StoreArgs {
    /// S3 endpoint (standalone; in Juju the `s3` relation gives it). `https://` when no scheme.
    #[arg(long, env = "ETCD_ACTIONS_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// S3 bucket; setting it turns uploads on. Credentials come only from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN.
    #[arg(long, env = "ETCD_ACTIONS_S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// Key prefix inside the bucket.
    #[arg(long, env = "ETCD_ACTIONS_S3_PATH")]
    pub s3_path: Option<String>,

    /// S3 region (default us-east-1).
    #[arg(long, env = "ETCD_ACTIONS_S3_REGION")]
    pub s3_region: Option<String>,

    /// `path` (default) or `host` style bucket addressing.
    #[arg(long, env = "ETCD_ACTIONS_S3_URI_STYLE")]
    pub s3_uri_style: Option<String>,

    /// PEM file of CA certificates to trust for the S3 endpoint.
    #[arg(long, env = "ETCD_ACTIONS_S3_CA_FILE")]
    pub s3_ca_file: Option<PathBuf>,

    /// Integrity headers: `auto` (CRC64NVME checksums where the store takes them, Content-MD5
    /// always), `crc64nvme` (always; a refusal is an error), or `md5` (Content-MD5 only, for
    /// stores that refuse checksum headers: MinIO before 2025-01-20, Backblaze B2, Wasabi).
    #[arg(long, env = "ETCD_ACTIONS_S3_CHECKSUM", default_value = "auto")]
    pub s3_checksum: String,

    /// Azure Blob endpoint (default `https://<account>.blob.core.windows.net`; path-style
    /// endpoints such as Azurite's are taken as they are).
    #[arg(long, env = "ETCD_ACTIONS_AZURE_ENDPOINT")]
    pub azure_endpoint: Option<String>,

    /// Azure storage account. The key comes only from AZURE_STORAGE_ACCOUNT_KEY.
    #[arg(long, env = "ETCD_ACTIONS_AZURE_ACCOUNT")]
    pub azure_account: Option<String>,

    /// Azure container; setting it sends archives to Azure Blob Storage.
    #[arg(long, env = "ETCD_ACTIONS_AZURE_CONTAINER")]
    pub azure_container: Option<String>,

    /// Folder inside the Azure container.
    #[arg(long, env = "ETCD_ACTIONS_AZURE_PATH")]
    pub azure_path: Option<String>,

    /// GCS bucket; setting it sends archives to Google Cloud Storage. The service-account key
    /// file comes only from GOOGLE_APPLICATION_CREDENTIALS (read into memory at start).
    #[arg(long, env = "ETCD_ACTIONS_GCS_BUCKET")]
    pub gcs_bucket: Option<String>,

    /// Folder inside the GCS bucket.
    #[arg(long, env = "ETCD_ACTIONS_GCS_PATH")]
    pub gcs_path: Option<String>,
}

/// Writing an archive (snapshot, backup, and restore's backup of the current data).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Archive")]
pub struct ArchiveArgs {
    /// gzip level of archives, 1 (fastest) to 9 (smallest).
    #[arg(long, env = "ETCD_ACTIONS_COMPRESSION_LEVEL", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=9))]
    pub compression_level: u32,

    /// Seconds a snapshot stream may take in all; a stream that makes no progress for 60 s
    /// fails sooner.
    #[arg(long, env = "ETCD_ACTIONS_SNAPSHOT_TIMEOUT", default_value_t = 3600)]
    pub snapshot_timeout: u64,
}

/// Encryption keys (age). Under Juju, the secret named by the `backup-encryption-secret`
/// option adds its own.
#[derive(Debug, Clone, Default, Args)]
pub struct KeyArgs {
    /// Encrypt new archives to this age recipient (`age1...`); repeat for several (an online
    /// key and an offline break-glass key). The env var takes several, separated by commas or
    /// newlines.
    #[arg(
        long = "encrypt-to",
        value_name = "RECIPIENT",
        env = "ETCD_ACTIONS_ENCRYPT_TO"
    )]
    pub encrypt_to: Vec<String>,

    /// age identity file (as age-keygen writes it) that opens encrypted archives, for restore,
    /// verify and drills. Read into memory only.
    #[arg(long, value_name = "FILE", env = "ETCD_ACTIONS_IDENTITY_FILE")]
    pub identity_file: Option<PathBuf>,
}

/// A group a command does not take on its command line, as its environment variables and
/// defaults give it.
pub fn from_env<T: clap::Args + clap::FromArgMatches>() -> Result<T, clap::Error> {
    let cmd = T::augment_args(clap::Command::new("etcd-actions"));
    let matches = cmd.try_get_matches_from(["etcd-actions"])?;
    T::from_arg_matches(&matches)
}

/// The groups of settings a command was given on its command line.
#[derive(Debug, Default)]
pub struct Given<'a> {
    pub service: Option<&'a ServiceArgs>,
    pub tools: Option<&'a ToolArgs>,
    pub store: Option<&'a StoreArgs>,
    pub archive: Option<&'a ArchiveArgs>,
    pub keys: Option<&'a KeyArgs>,
}

impl Command {
    /// The groups this command takes.
    pub fn given(&self) -> Given<'_> {
        match self {
            Command::Snapshot(a) => Given {
                store: Some(&a.store),
                archive: Some(&a.archive),
                keys: Some(&a.keys),
                ..Given::default()
            },
            Command::Restore(a) => Given {
                service: Some(&a.service),
                tools: Some(&a.tools),
                store: Some(&a.store),
                archive: Some(&a.archive),
                keys: Some(&a.keys),
            },
            Command::Export(a) => Given {
                tools: Some(&a.tools),
                store: Some(&a.store),
                keys: Some(&a.keys),
                ..Given::default()
            },
            Command::Import(a) => Given {
                tools: Some(&a.tools),
                store: Some(&a.store),
                archive: Some(&a.archive),
                keys: Some(&a.keys),
                ..Given::default()
            },
            Command::ListBackups(a) => Given {
                store: Some(&a.store),
                ..Given::default()
            },
            Command::Verify(a) => Given {
                tools: Some(&a.tools),
                store: Some(&a.store),
                keys: Some(&a.keys),
                ..Given::default()
            },
            Command::Prune(a) => Given {
                store: Some(&a.store),
                ..Given::default()
            },
            Command::Backup(a) => Given {
                store: Some(&a.store),
                archive: Some(&a.archive),
                keys: Some(&a.keys),
                ..Given::default()
            },
            Command::Schedule(a) => Given {
                service: Some(&a.service),
                tools: Some(&a.tools),
                store: Some(&a.store),
                archive: Some(&a.archive),
                keys: Some(&a.keys),
            },
            Command::Follow(a) => Given {
                store: Some(&a.store),
                archive: Some(&a.archive),
                keys: Some(&a.keys),
                ..Given::default()
            },
            Command::Hook { .. } | Command::Status(_) => Given::default(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take a consistent snapshot of this unit's etcd into a .tar.gz archive.
    Snapshot(SnapshotArgs),
    /// Restore a snapshot archive as a new single-member cluster on this unit.
    Restore(RestoreArgs),
    /// List the archives in the target directory and in the object store.
    ListBackups(ListArgs),
    /// Check an archive as restore would; with --deep, run a restore drill on a throwaway etcd.
    Verify(VerifyArgs),
    /// Delete archives by a retention policy (restic's forget rules), locally and in the store.
    Prune(PruneArgs),
    /// For timers: snapshot if changed (uploaded when a store is configured), then prune by
    /// ETCD_ACTIONS_RETENTION. Exits 0 also when nothing changed.
    Backup(BackupArgs),
    /// Print (and with --install, install) a systemd service + timer running `backup`.
    Schedule(ScheduleArgs),
    /// Backup health from what the last runs left: newest backups, last drill, schedule,
    /// last error. Cheap: no snapshot, no store listing.
    Status(StatusArgs),
    /// Record every change from etcd's watch stream into change segments (the history a
    /// restore to a revision or a time replays); runs until SIGTERM, as a service runs it.
    Follow(FollowArgs),
    /// Write the keys under a prefix, as they were at one revision, to an export file: from
    /// the live cluster, an archive (offline), or a point of the change history.
    Export(ExportArgs),
    /// Apply the keys under a prefix from an export, an archive or a point of the history
    /// into the running cluster (a dry run unless --dry-run=false).
    Import(ImportArgs),
    /// Run a charm hook (the charm's `hooks/<name>` links to this binary).
    #[command(hide = true)]
    Hook { name: String },
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// Archive (or plain db) to verify; default: the newest in --target or the store.
    #[arg(long)]
    pub snapshot: Option<PathBuf>,

    /// A backup id from list-backups.
    #[arg(long)]
    pub backup_id: Option<String>,

    /// Directory of local archives.
    #[arg(long, default_value = DEFAULT_TARGET)]
    pub target: PathBuf,

    /// Also restore it into a throwaway etcd on loopback and compare revision and key count.
    #[arg(long)]
    pub deep: bool,

    #[command(flatten)]
    pub tools: ToolArgs,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Debug, Clone, Args)]
pub struct PruneArgs {
    /// Directory of local archives.
    #[arg(long, default_value = DEFAULT_TARGET)]
    pub target: PathBuf,
    /// Keep the N newest archives.
    #[arg(long, allow_negative_numbers = true)]
    pub keep_last: Option<i64>,
    /// Keep the newest archive of each of the last N hours that have one.
    #[arg(long, allow_negative_numbers = true)]
    pub keep_hourly: Option<i64>,
    /// ... of each of the last N days.
    #[arg(long, allow_negative_numbers = true)]
    pub keep_daily: Option<i64>,
    /// ... of each of the last N ISO weeks.
    #[arg(long, allow_negative_numbers = true)]
    pub keep_weekly: Option<i64>,
    /// ... of each of the last N months.
    #[arg(long, allow_negative_numbers = true)]
    pub keep_monthly: Option<i64>,
    /// ... of each of the last N years.
    #[arg(long, allow_negative_numbers = true)]
    pub keep_yearly: Option<i64>,
    /// Keep every archive this much younger than the newest (e.g. 14d, 2w, 1y6m, 12h).
    #[arg(long)]
    pub keep_within: Option<String>,
    /// Only say what would be removed.
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    /// Directory the archive is written to.
    #[arg(long, default_value = DEFAULT_TARGET)]
    pub target: PathBuf,

    /// Retention policy, e.g. `last=7,daily=7,weekly=4`; empty: no pruning.
    #[arg(long, env = "ETCD_ACTIONS_RETENTION", default_value = "")]
    pub retention: String,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub archive: ArchiveArgs,

    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ScheduleArgs {
    /// When to run, as systemd's OnCalendar (e.g. `daily`, `*-*-* 02:30:00`).
    #[arg(long)]
    pub on_calendar: String,

    /// Directory the backups are written to.
    #[arg(long, default_value = DEFAULT_TARGET)]
    pub target: PathBuf,

    /// Write the units to /etc/systemd/system and enable the timer.
    #[arg(long)]
    pub install: bool,

    #[command(flatten)]
    pub service: ServiceArgs,

    #[command(flatten)]
    pub tools: ToolArgs,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub archive: ArchiveArgs,

    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Debug, Clone, Args)]
pub struct FollowArgs {
    /// Directory of the full snapshots; the history goes to its `changes/` folder.
    #[arg(long, default_value = DEFAULT_TARGET)]
    pub target: PathBuf,

    /// Seconds after its first change within which a segment is durable (fsync'd); also
    /// written at 8 MiB of changes.
    #[arg(long, env = "ETCD_ACTIONS_FLUSH_INTERVAL", default_value_t = 5)]
    pub flush_interval: u64,

    /// A new full snapshot when the changes since the last one pass an age or a size:
    /// `1h`, `256MiB`, or both (`1h,256MiB`). Bounds a restore's replay.
    #[arg(long, env = "ETCD_ACTIONS_FULL_EVERY", default_value = FULL_EVERY_DEFAULT)]
    pub full_every: String,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub archive: ArchiveArgs,

    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Directory of local archives.
    #[arg(long, default_value = DEFAULT_TARGET)]
    pub target: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Directory of local archives.
    #[arg(long, default_value = DEFAULT_TARGET)]
    pub target: PathBuf,

    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SnapshotArgs {
    /// Directory the archive is written to (absolute; created 0700 if missing).
    #[arg(long, default_value = DEFAULT_TARGET)]
    pub target: PathBuf,

    /// Write nothing when the newest snapshot (in --target or the store) already holds this
    /// cluster at its current revision.
    #[arg(long)]
    pub if_changed: bool,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub archive: ArchiveArgs,

    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub from: BackupSourceArgs,

    /// Directory the unit's current data is backed up to first.
    #[arg(long, default_value = DEFAULT_TARGET)]
    pub target: PathBuf,

    /// Do not back up the current data first.
    #[arg(long)]
    pub skip_backup: bool,

    /// Expected sha256 of the archive (hex).
    #[arg(long)]
    pub sha256: Option<String>,

    #[command(flatten)]
    pub service: ServiceArgs,

    #[command(flatten)]
    pub tools: ToolArgs,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub archive: ArchiveArgs,

    #[command(flatten)]
    pub keys: KeyArgs,
}

/// A backup as the source of an export or an import.
#[derive(Debug, Clone, Default, Args)]
pub struct BackupSourceArgs {
    /// Snapshot archive (or plain `etcdctl snapshot save` db). In Juju mode a restore uses the
    /// `snapshot` resource when neither this nor --backup-id is given.
    #[arg(long)]
    pub snapshot: Option<PathBuf>,

    /// A backup id from list-backups: an archive in --target or in the object store.
    #[arg(long, conflicts_with = "snapshot")]
    pub backup_id: Option<String>,

    /// This revision: the newest full snapshot at or below it (in --target or the store) with
    /// the change history `follow` recorded applied up to it.
    #[arg(long, conflicts_with_all = ["snapshot", "backup_id", "to_time"])]
    pub to_revision: Option<i64>,

    /// The last revision received at or before this time (RFC 3339, e.g.
    /// `2026-11-30T14:05:00Z`).
    #[arg(long, conflicts_with_all = ["snapshot", "backup_id"])]
    pub to_time: Option<String>,

    /// The Juju application whose store folder holds the full snapshots and the change
    /// history (a clone or migration into another application); with --backup-id, the
    /// application whose folder holds that archive. Default: this one.
    #[arg(long)]
    pub from_app: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Export the keys starting with this prefix (default: every key).
    #[arg(long, default_value = "")]
    pub prefix: String,

    /// The live cluster's revision to export (default: the current one).
    #[arg(long, conflicts_with_all = ["snapshot", "backup_id", "to_revision", "to_time"])]
    pub revision: Option<i64>,

    #[command(flatten)]
    pub from: BackupSourceArgs,

    /// Directory the export is written to (and of local archives and history).
    #[arg(long, default_value = DEFAULT_TARGET)]
    pub target: PathBuf,

    #[command(flatten)]
    pub tools: ToolArgs,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// An export file (written by export) to apply.
    #[arg(long, conflicts_with_all = ["snapshot", "backup_id", "to_revision", "to_time"])]
    pub file: Option<PathBuf>,

    #[command(flatten)]
    pub from: BackupSourceArgs,

    /// Apply only the keys under this prefix (default: the export's prefix; from a backup,
    /// every key).
    #[arg(long)]
    pub prefix: Option<String>,

    /// add: only missing keys; overwrite: also replace keys whose value differs; sync: as
    /// overwrite, and delete keys under the prefix that the source lacks.
    #[arg(long, default_value = "add")]
    pub mode: String,

    /// Plan and report only (the default); --dry-run=false writes.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    pub dry_run: bool,

    /// Do not snapshot the cluster before writing.
    #[arg(long)]
    pub skip_backup: bool,

    /// Refuse to write when the import would touch more keys than this.
    #[arg(long, default_value_t = IMPORT_MAX_KEYS)]
    pub max_keys: i64,

    /// Directory of the snapshot taken first (and of local archives and history).
    #[arg(long, default_value = DEFAULT_TARGET)]
    pub target: PathBuf,

    #[command(flatten)]
    pub tools: ToolArgs,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub archive: ArchiveArgs,

    #[command(flatten)]
    pub keys: KeyArgs,
}

/// Rewrites argv for multi-call use: invoked as `snapshot` or `restore` (a link to this binary),
/// the name becomes the subcommand.
pub fn normalize_args(args: Vec<OsString>) -> Vec<OsString> {
    let Some(first) = args.first() else {
        return vec!["etcd-actions".into()];
    };
    let argv0 = Path::new(first)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    // Run by the charm's `dispatch` (Juju 2.8+): the hook or action is JUJU_DISPATCH_PATH's.
    let dispatched = (args.len() == 1 && argv0.as_deref() == Some("etcd-actions"))
        .then(|| std::env::var("JUJU_DISPATCH_PATH").ok())
        .flatten()
        .filter(|p| p.starts_with("hooks/") || p.starts_with("actions/"));
    let name = match &dispatched {
        Some(p) => p.rsplit('/').next().map(str::to_string),
        None => argv0,
    };
    match name.as_deref() {
        Some(
            action @ ("snapshot" | "restore" | "list-backups" | "verify" | "prune" | "export"
            | "import"),
        ) => {
            let mut out: Vec<OsString> = vec!["etcd-actions".into(), action.into()];
            out.extend(args.into_iter().skip(1));
            out
        }
        Some("backup-status") => {
            let mut out: Vec<OsString> = vec!["etcd-actions".into(), "status".into()];
            out.extend(args.into_iter().skip(1));
            out
        }
        Some(hook)
            if hook.starts_with("s3-credentials-relation-")
                || hook.starts_with("azure-storage-credentials-relation-")
                || hook.starts_with("gcs-credentials-relation-")
                || hook == "config-changed"
                || hook == "secret-changed"
                || hook == "update-status" =>
        {
            vec!["etcd-actions".into(), "hook".into(), hook.into()]
        }
        // Any other hook `dispatch` runs: the hook command says there is nothing to do.
        Some(hook)
            if dispatched
                .as_deref()
                .is_some_and(|p| p.starts_with("hooks/")) =>
        {
            vec!["etcd-actions".into(), "hook".into(), hook.into()]
        }
        _ => settings_after_command(args),
    }
}

/// Settings of a command's groups given before the command (`etcd-actions --s3-bucket b
/// snapshot`, as every setting could be before they were per command) are moved after it,
/// where the command takes them, or refuses them when it does not use them.
fn settings_after_command(args: Vec<OsString>) -> Vec<OsString> {
    use clap::CommandFactory;
    let top = Arguments::command();
    let commands: Vec<String> = top
        .get_subcommands()
        .flat_map(|s| {
            std::iter::once(s.get_name().to_string()).chain(s.get_all_aliases().map(str::to_string))
        })
        .collect();
    let long_of = |a: &clap::Arg| {
        a.get_long()
            .map(|l| (l.to_string(), a.get_action().takes_values()))
    };
    let global: Vec<(String, bool)> = top.get_arguments().filter_map(long_of).collect();
    let grouped: Vec<(String, bool)> = top
        .get_subcommands()
        .flat_map(|s| s.get_arguments().filter_map(long_of).collect::<Vec<_>>())
        .filter(|(l, _)| !global.iter().any(|(g, _)| g == l))
        .collect();
    let takes_value = |flag: &str| {
        global
            .iter()
            .chain(&grouped)
            .find(|(l, _)| l == flag)
            .is_some_and(|(_, v)| *v)
    };
    let mut before = vec![args[0].clone()];
    let mut moved = Vec::new();
    let mut rest = args.into_iter().skip(1);
    while let Some(arg) = rest.next() {
        let text = arg.to_string_lossy().into_owned();
        if commands.contains(&text) {
            before.push(arg);
            before.extend(moved);
            before.extend(rest);
            return before;
        }
        let Some(flag) = text.strip_prefix("--") else {
            before.push(arg);
            continue;
        };
        let (name, inline_value) = match flag.split_once('=') {
            Some((n, _)) => (n.to_string(), true),
            None => (flag.to_string(), false),
        };
        let to = if grouped.iter().any(|(l, _)| *l == name) {
            &mut moved
        } else {
            &mut before
        };
        to.push(arg);
        if takes_value(&name) && !inline_value {
            if let Some(value) = rest.next() {
                to.push(value);
            }
        }
    }
    // No command: leave it all for clap to explain.
    before.extend(moved);
    before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_call_names_become_subcommands() {
        let args = normalize_args(vec!["/charm/actions/snapshot".into(), "--target".into()]);
        assert_eq!(
            args,
            vec![
                OsString::from("etcd-actions"),
                "snapshot".into(),
                "--target".into()
            ]
        );
        let args = normalize_args(vec!["etcd-actions".into(), "restore".into()]);
        assert_eq!(args, vec![OsString::from("etcd-actions"), "restore".into()]);
    }

    #[test]
    fn each_command_shows_only_what_it_uses() {
        use clap::CommandFactory;
        let mut all = Arguments::command();
        // Global settings reach the subcommands when the command is built.
        all.build();
        let mut help = |name: &str| {
            all.find_subcommand_mut(name)
                .unwrap()
                .render_long_help()
                .to_string()
        };
        let snapshot = help("snapshot");
        for absent in [
            "--stop-command",
            "--start-command",
            "--bump-revision",
            "--service-timeout",
            "--etcdutl",
        ] {
            assert!(!snapshot.contains(absent), "snapshot --help shows {absent}");
        }
        for present in [
            "--s3-bucket",
            "--compression-level",
            "--etcd-config",
            "ETCD_ACTIONS_S3_BUCKET",
        ] {
            assert!(
                snapshot.contains(present),
                "snapshot --help lacks {present}"
            );
        }
        let restore = help("restore");
        for present in [
            "--stop-command",
            "--bump-revision",
            "--etcdutl",
            "ETCD_ACTIONS_STOP_COMMAND",
        ] {
            assert!(restore.contains(present), "restore --help lacks {present}");
        }
        let list = help("list-backups");
        assert!(!list.contains("--compression-level") && !list.contains("--stop-command"));
    }

    #[test]
    fn settings_given_before_the_command_still_count() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let parsed = Arguments::try_parse_from(normalize_args(args(&[
            "etcd-actions",
            "--s3-bucket",
            "b",
            "--etcd-config=/etc/etcd.yml",
            "--s3-endpoint=http://127.0.0.1:9",
            "schedule",
            "--on-calendar",
            "daily",
        ])))
        .unwrap();
        assert_eq!(parsed.settings.etcd_config, PathBuf::from("/etc/etcd.yml"));
        let Command::Schedule(s) = parsed.command else {
            panic!("not schedule")
        };
        assert_eq!(s.store.s3_bucket.as_deref(), Some("b"));
        assert_eq!(s.store.s3_endpoint.as_deref(), Some("http://127.0.0.1:9"));
        // A value that is also a command name is a value.
        let parsed = Arguments::try_parse_from(normalize_args(args(&[
            "etcd-actions",
            "--s3-path",
            "backup",
            "snapshot",
        ])))
        .unwrap();
        let Command::Snapshot(s) = parsed.command else {
            panic!("not snapshot")
        };
        assert_eq!(s.store.s3_path.as_deref(), Some("backup"));
        // A command that does not use a setting still refuses it.
        assert!(Arguments::try_parse_from(normalize_args(args(&[
            "etcd-actions",
            "--stop-command",
            "x",
            "snapshot",
        ])))
        .is_err());
    }

    #[test]
    fn parser_is_consistent() {
        use clap::CommandFactory;
        Arguments::command().debug_assert();
    }
}
