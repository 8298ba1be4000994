//! The node's wasmtime engines: configuration, epoch ticker, compilation (memory and disk
//! caches), and the linkers components are linked against. WASIp2 components and commands
//! run on an engine without the component-model async ABI; WASIp3 components on a second
//! one with it, made with the first such component. An engine with the async ABI runs every
//! call through its concurrent event loop, which costs a p2 request ~10 % of a reused
//! instance's throughput (BENCHMARKS.md), so p2 guests do not pay for p3's machinery.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::cache;
use crate::command::Command;
use crate::config::{InstanceConfig, RuntimeConfig, format_bytes};
use crate::cpu::{CpuScheduler, CpuUsage};
use crate::error::RuntimeError;
use crate::host::{Host, InstanceSettings};
use crate::http::HttpService;
use crate::memory::{MemoryBudget, Reservation};
use crate::stats::CompileCache;

/// Pool slots reserved per instance of a component. A wasm32-wasip2 component instantiates a
/// handful of core modules (the program plus wit-component shims) with typically one memory;
/// the slack covers composed components.
const CORE_INSTANCES_PER_COMPONENT: u32 = 16;
const MEMORIES_PER_COMPONENT: u32 = 2;
const TABLES_PER_COMPONENT: u32 = 4;

/// Guard region after (and before) each linear memory. Memories here are smaller than 4 GiB,
/// so bounds checks stay; the guard lets Cranelift fold checks for small static offsets.
const MEMORY_GUARD_BYTES: u64 = 4 << 20;

const WASM_PAGE: u64 = 64 << 10;

/// Bytes of a freed memory/table slot reset in place rather than with `madvise`. Per-request
/// instances free a slot on every request; `madvise` costs TLB shootdowns across all threads
/// and page faults on reuse, which dominated profiles of the hot path. Without the kernel's
/// `PAGEMAP_SCAN` the whole size is memset on every free, so it stays small.
const KEEP_RESIDENT_MEMORY: usize = 128 << 10;
/// The same with `PAGEMAP_SCAN` (Linux 6.7+): only the pages the instance wrote are reset, so
/// the whole first MiB — a Rust guest's stack and first data — is kept. Fresh instances served
/// about twice the requests per second of 128 KiB without the scan (`wasmtime serve` with the
/// same flags too). A slot keeps at most the pages its instances wrote there resident.
const KEEP_RESIDENT_MEMORY_SCANNED: usize = 1 << 20;
const KEEP_RESIDENT_TABLE: usize = 64 << 10;

/// Handle to the node's wasmtime engines. Cheap to clone; the epoch ticker and the guest
/// threads run until the last clone — including those held by [`HttpService`]s and
/// [`Command`]s — is dropped.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

/// An engine, the linker for it and the directory of the artifacts it compiled.
struct EngineSet {
    engine: Engine,
    linker: Linker<Host>,
    /// `cache_dir/<engine compatibility hash>`.
    artifact_dir: PathBuf,
}

/// The engines whose epoch the ticker and the CPU scheduler advance together.
#[derive(Default)]
pub(crate) struct Epochs(RwLock<Vec<Engine>>);

impl Epochs {
    fn add(&self, engine: Engine) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(engine);
    }

    pub(crate) fn increment(&self) {
        for engine in self.0.read().unwrap_or_else(|p| p.into_inner()).iter() {
            engine.increment_epoch();
        }
    }
}

struct RuntimeInner {
    /// p2 components and commands.
    main: EngineSet,
    /// p3 components, once there has been one.
    concurrent: Mutex<Option<Arc<EngineSet>>>,
    epochs: Arc<Epochs>,
    config: RuntimeConfig,
    components: Mutex<HashMap<String, Arc<OnceCell<Component>>>>,
    ticker: EpochTicker,
    /// The executor every guest runs on: its own threads, so a busy guest never holds up
    /// the caller's (the gateway's accept and proxy loops, the agent).
    guests: Option<tokio::runtime::Runtime>,
    guest_handle: tokio::runtime::Handle,
    /// Where a guest task moves once it has used more CPU than a request takes
    /// ([`crate::cpu`]): threads at a lower priority than the rest of the process.
    batch: Option<tokio::runtime::Runtime>,
    cpu: Arc<CpuScheduler>,
    /// What every instance's memory is reserved from; shared with the tasks that drop idle
    /// instances when someone waits for it.
    memory: Arc<MemoryBudget>,
    /// Loads the disk cache served and loads that compiled.
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        self.ticker.stop();
        // Without waiting: the last clone may be dropped on an async task, even on a guest
        // thread, where a blocking shutdown would panic or deadlock. Guests still running
        // are cancelled.
        if let Some(guests) = self.guests.take() {
            guests.shutdown_background();
        }
        if let Some(batch) = self.batch.take() {
            batch.shutdown_background();
        }
    }
}

/// Where [`Runtime::load`] found a component; for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoadSource {
    /// Already loaded by this runtime (or being loaded by a concurrent call).
    Memory,
    /// Precompiled artifact from an earlier run, deserialized without compiling.
    DiskCache,
    /// Compiled now from the `.wasm`.
    Compiled,
}

impl std::fmt::Display for LoadSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoadSource::Memory => "memory",
            LoadSource::DiskCache => "disk cache",
            LoadSource::Compiled => "compiled",
        })
    }
}

/// A compiled component, ready to be turned into an [`HttpService`] or a [`Command`]. Cheap to
/// clone (the compiled code is shared).
#[derive(Clone)]
pub struct Loaded {
    component: Component,
    digest: Arc<str>,
    source: LoadSource,
    elapsed: Duration,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("digest", &self.digest)
            .field("source", &self.source)
            .field("elapsed", &self.elapsed)
            .finish_non_exhaustive()
    }
}

impl Loaded {
    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn source(&self) -> LoadSource {
        self.source
    }

    /// Time `load` took, compile or deserialize included.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Names of the component's exports, e.g. `wasi:http/incoming-handler@0.2.0`.
    pub fn exports(&self) -> Vec<String> {
        let engine = self.component.engine();
        self.component
            .component_type()
            .exports(engine)
            .map(|(name, _)| name.to_string())
            .collect()
    }

    fn exports_list(&self) -> String {
        let exports = self.exports();
        if exports.is_empty() {
            "nothing".to_string()
        } else {
            exports.join(", ")
        }
    }

    fn exports_interface(&self, prefix: &str) -> bool {
        self.exports().iter().any(|name| name.starts_with(prefix))
    }
}

impl Runtime {
    /// Creates the main engine (component model, async host calls, pooling allocator sized
    /// from `config`, epoch interruption), its linker, the cache directory and the epoch
    /// ticker.
    pub fn new(config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let main = engine_set(&config, false)?;
        let epochs = Arc::new(Epochs::default());
        epochs.add(main.engine.clone());

        let threads = match config.guest_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let guests = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("shoal-guest")
            .enable_all()
            .build()
            .map_err(|e| RuntimeError::Engine(format!("cannot start the guest threads: {e}")))?;
        let guest_handle = guests.handle().clone();
        let batch = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("shoal-batch")
            .on_thread_start(|| crate::cpu::set_thread_nice(crate::cpu::BATCH_NICE))
            .enable_all()
            .build()
            .map_err(|e| RuntimeError::Engine(format!("cannot start the batch threads: {e}")))?;
        let cpu = Arc::new(CpuScheduler::new(
            epochs.clone(),
            config.epoch_tick,
            threads,
            Some(batch.handle().clone()),
        ));

        let ticker = EpochTicker::spawn(epochs.clone(), config.epoch_tick)?;
        let memory = Arc::new(MemoryBudget::new(config.memory_budget_bytes));
        tracing::info!(
            cache = %main.artifact_dir.display(),
            max_instances = config.max_instances,
            max_memory = %format_bytes(config.max_memory_bytes),
            memory_budget = %format_bytes(memory.total()),
            epoch_tick = ?config.epoch_tick,
            guest_threads = threads,
            pagemap_scan = memory_reset().1,
            "wasmtime engine ready"
        );
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                main,
                concurrent: Mutex::new(None),
                epochs,
                config,
                components: Mutex::new(HashMap::new()),
                ticker,
                guests: Some(guests),
                guest_handle,
                batch: Some(batch),
                cpu,
                memory,
                cache_hits: AtomicU64::new(0),
                cache_misses: AtomicU64::new(0),
            }),
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The directory holding the main engine's precompiled artifacts (p2 components).
    pub fn artifact_dir(&self) -> &Path {
        &self.inner.main.artifact_dir
    }

    /// The engine for p3 components, made now if this is the first.
    fn concurrent(&self) -> Result<Arc<EngineSet>, RuntimeError> {
        let mut concurrent = lock(&self.inner.concurrent);
        if let Some(set) = &*concurrent {
            return Ok(set.clone());
        }
        let set = Arc::new(engine_set(&self.inner.config, true)?);
        self.inner.epochs.add(set.engine.clone());
        tracing::info!(cache = %set.artifact_dir.display(), "wasmtime engine for WASIp3 components ready");
        *concurrent = Some(set.clone());
        Ok(set)
    }

    /// The compiled component for `digest`, compiling `wasm_path` only if neither memory nor
    /// the disk cache has it. Concurrent calls for one digest share a single compilation.
    /// The caller vouches that `wasm_path` holds the bytes `digest` names.
    pub async fn load(&self, digest: &str, wasm_path: &Path) -> Result<Loaded, RuntimeError> {
        let started = Instant::now();
        let cell = {
            let mut components = lock(&self.inner.components);
            components.entry(digest.to_string()).or_default().clone()
        };

        let mut source = LoadSource::Memory;
        let component = cell
            .get_or_try_init(|| async {
                let (component, from) = self.load_uncached(digest, wasm_path).await?;
                source = from;
                Ok::<_, RuntimeError>(component)
            })
            .await?
            .clone();

        let elapsed = started.elapsed();
        let counter = match source {
            LoadSource::Memory => None,
            LoadSource::DiskCache => Some(&self.inner.cache_hits),
            LoadSource::Compiled => Some(&self.inner.cache_misses),
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%digest, %source, ?elapsed, "component loaded");
        }
        Ok(Loaded {
            component,
            digest: digest.into(),
            source,
            elapsed,
        })
    }

    /// Forgets the in-memory copy of `digest` (services built from it keep working); the disk
    /// artifact stays. Returns whether it was loaded.
    pub fn evict(&self, digest: &str) -> bool {
        lock(&self.inner.components).remove(digest).is_some()
    }

    /// The module digests this runtime holds compiled: in memory, or on disk in any engine's
    /// cache (earlier runs' and other versions' included).
    pub fn cached(&self) -> BTreeSet<String> {
        let mut digests: BTreeSet<String> = lock(&self.inner.components).keys().cloned().collect();
        for file in cache::artifacts(&self.inner.config.cache_dir) {
            if let Some(digest) = cache::digest_of(&file) {
                digests.insert(digest);
            }
        }
        digests
    }

    /// Forgets `digest` in memory and on disk, in every engine's cache: for a module no
    /// replica on the node runs any more. Services built from it keep working.
    pub fn forget(&self, digest: &str) {
        self.evict(digest);
        for file in cache::artifacts(&self.inner.config.cache_dir) {
            if cache::digest_of(&file).as_deref() == Some(digest)
                && let Err(e) = std::fs::remove_file(&file)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %file.display(), error = %e, "cannot remove a compiled component");
            }
        }
    }

    /// Compiles for the main engine, or, if that cannot (the component uses the async ABI:
    /// a p3 one), for the p3 engine, whose error is then the one to report: it accepts
    /// everything the main one does.
    async fn load_uncached(
        &self,
        digest: &str,
        wasm_path: &Path,
    ) -> Result<(Component, LoadSource), RuntimeError> {
        let main = self.load_with(&self.inner.main, digest, wasm_path).await;
        match main {
            Err(RuntimeError::Compile { .. }) => {
                let concurrent = self.concurrent()?;
                self.load_with(&concurrent, digest, wasm_path).await
            }
            loaded => loaded,
        }
    }

    async fn load_with(
        &self,
        set: &EngineSet,
        digest: &str,
        wasm_path: &Path,
    ) -> Result<(Component, LoadSource), RuntimeError> {
        let engine = set.engine.clone();
        let artifact = cache::artifact_path(&set.artifact_dir, digest);
        let digest = digest.to_string();
        let wasm_path = wasm_path.to_path_buf();
        tokio::task::spawn_blocking(move || load_blocking(&engine, &artifact, &digest, &wasm_path))
            .await
            .map_err(|e| RuntimeError::Internal(format!("compilation task failed: {e}")))?
    }

    /// An HTTP service for `loaded`: links it once, then serves requests with instances of
    /// it. Fails if the component is neither a p2 `wasi:http/proxy` nor a p3
    /// `wasi:http/service`, or needs imports Shoal does not provide.
    pub fn http_service(
        &self,
        loaded: &Loaded,
        cfg: InstanceConfig,
    ) -> Result<HttpService, RuntimeError> {
        let p3 = loaded.exports_interface("wasi:http/handler@0.3");
        if !p3 && !loaded.exports_interface("wasi:http/incoming-handler@0.2") {
            return Err(RuntimeError::NotHttp {
                digest: loaded.digest().to_string(),
                exports: loaded.exports_list(),
            });
        }
        let settings = self.settings(loaded, cfg)?;
        let pre = self.instantiate_pre(loaded)?;
        let digest = loaded.digest.clone();
        if p3 {
            let pre = wasmtime_wasi_http::p3::bindings::ServicePre::new(pre)
                .map_err(|e| link_error(loaded, &e))?;
            return Ok(HttpService::p3(self.clone(), digest, pre, settings));
        }
        let pre = wasmtime_wasi_http::p2::bindings::ProxyPre::new(pre)
            .map_err(|e| link_error(loaded, &e))?;
        Ok(HttpService::p2(self.clone(), digest, pre, settings))
    }

    /// A runnable `wasi:cli/command` for `loaded` (jobs and daemons).
    pub fn command(&self, loaded: &Loaded, cfg: InstanceConfig) -> Result<Command, RuntimeError> {
        if !loaded.exports_interface("wasi:cli/run@0.2") {
            return Err(RuntimeError::NotCommand {
                digest: loaded.digest().to_string(),
                exports: loaded.exports_list(),
            });
        }
        let settings = self.settings(loaded, cfg)?;
        let pre = self.instantiate_pre(loaded)?;
        let pre = wasmtime_wasi::p2::bindings::CommandPre::new(pre)
            .map_err(|e| link_error(loaded, &e))?;
        Ok(Command::new(
            self.clone(),
            loaded.digest.clone(),
            pre,
            settings,
        ))
    }

    /// The executor guests run on.
    pub(crate) fn guests(&self) -> &tokio::runtime::Handle {
        &self.inner.guest_handle
    }

    /// CPU consumed on this node per group ([`crate::CpuShare::group`], one per app), sorted
    /// by group: time its guests ran and time they waited for their share or limit, since
    /// the group's first replica here started. A group is listed while it has a replica
    /// (an [`HttpService`] or [`Command`]) alive; with its last one its account goes.
    pub fn cpu_usage(&self) -> Vec<(Arc<str>, CpuUsage)> {
        self.inner.cpu.usage()
    }

    /// Bytes of the memory budget held by instances alive now (whole 64 KiB pages): never
    /// more than [`Runtime::memory_budget`].
    pub fn memory_reserved(&self) -> u64 {
        self.inner.memory.reserved()
    }

    /// Instances alive now (each holds its room in the memory budget): serving, kept for
    /// reuse, or running a job.
    pub fn instances_alive(&self) -> u64 {
        self.inner.memory.held() as u64
    }

    /// Bytes of the memory budget: [`RuntimeConfig::memory_budget_bytes`] in whole 64 KiB pages.
    pub fn memory_budget(&self) -> u64 {
        self.inner.memory.total()
    }

    /// How the components loaded since this runtime started were found: in the on-disk
    /// compile cache, or compiled.
    pub fn compile_cache(&self) -> CompileCache {
        CompileCache {
            hits: self.inner.cache_hits.load(Ordering::Relaxed),
            misses: self.inner.cache_misses.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn memory(&self) -> &Arc<MemoryBudget> {
        &self.inner.memory
    }

    /// Room for one instance with `settings` in the memory budget, waiting as long as the
    /// configuration allows, never past the request's (or run's) timeout; `None` if there was
    /// none in time.
    pub(crate) async fn reserve_memory(&self, settings: &InstanceSettings) -> Option<Reservation> {
        let wait = match settings.timeout {
            Some(timeout) => timeout.min(self.inner.config.memory_wait),
            None => self.inner.config.memory_wait,
        };
        self.inner
            .memory
            .reserve(settings.cpu.group(), settings.memory_limit as u64, wait)
            .await
    }

    /// Links `loaded` with the linker of the engine it was compiled for.
    fn instantiate_pre(
        &self,
        loaded: &Loaded,
    ) -> Result<wasmtime::component::InstancePre<Host>, RuntimeError> {
        let engine = loaded.component.engine();
        let result = if Engine::same(engine, &self.inner.main.engine) {
            self.inner.main.linker.instantiate_pre(&loaded.component)
        } else {
            self.concurrent()?.linker.instantiate_pre(&loaded.component)
        };
        result.map_err(|e| link_error(loaded, &e))
    }

    fn settings(
        &self,
        loaded: &Loaded,
        cfg: InstanceConfig,
    ) -> Result<InstanceSettings, RuntimeError> {
        let max = self.inner.config.max_memory_bytes;
        let invalid = |message: String| RuntimeError::Instance {
            digest: loaded.digest().to_string(),
            message,
        };
        if cfg.memory_limit == 0 {
            return Err(invalid("the memory limit must be greater than 0".into()));
        }
        if cfg.memory_limit > max {
            return Err(invalid(format!(
                "memory limit {} exceeds this node's per-instance maximum of {}",
                format_bytes(cfg.memory_limit),
                format_bytes(max)
            )));
        }
        let budget = self.inner.memory.total();
        if cfg.memory_limit > budget {
            return Err(invalid(format!(
                "memory limit {} exceeds this node's memory budget of {}: no instance could start",
                format_bytes(cfg.memory_limit),
                format_bytes(budget)
            )));
        }
        if cfg.timeout == Some(Duration::ZERO) {
            return Err(invalid("the timeout must be greater than 0".into()));
        }
        if cfg.cpu.limit_millis == Some(0) {
            return Err(invalid("the CPU limit must be greater than 0".into()));
        }
        if cfg.volumes.iter().filter(|v| !v.read_only).count() > 1 {
            return Err(invalid("at most one volume may be writable".into()));
        }
        for v in &cfg.volumes {
            if !v.host.is_dir() {
                return Err(invalid(format!(
                    "volume directory {} does not exist",
                    v.host.display()
                )));
            }
        }
        let concurrent = !Engine::same(loaded.component.engine(), &self.inner.main.engine);
        if concurrent && cfg.volumes.iter().any(|v| !v.read_only) {
            return Err(invalid(
                "a writable volume needs a WASIp2 component: its size limit is kept on WASIp2's filesystem calls"
                    .into(),
            ));
        }
        if cfg.reuse.requests == 0 || cfg.reuse.idle.is_zero() || cfg.reuse.concurrent == 0 {
            return Err(invalid(
                "instance reuse needs at least one request, one at a time and an idle time".into(),
            ));
        }
        Ok(InstanceSettings {
            env: cfg.env,
            config: Arc::new(cfg.config.into_iter().collect()),
            args: cfg.args,
            memory_limit: usize::try_from(cfg.memory_limit)
                .map_err(|_| invalid("memory limit too large for this host".into()))?,
            timeout: cfg.timeout,
            logs: cfg.logs,
            outbound: cfg.outbound,
            incidents: cfg.incidents,
            cpu: self.inner.cpu.join(cfg.cpu),
            reuse: cfg.reuse,
            keyvalue: cfg.keyvalue.map(Arc::new),
            volumes: cfg.volumes,
            stats: cfg.stats,
        })
    }
}

fn link_error(loaded: &Loaded, err: &wasmtime::Error) -> RuntimeError {
    RuntimeError::Link {
        digest: loaded.digest().to_string(),
        message: format!("{err:#}"),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Disk cache first; on a miss (or an unusable file) compile and store the artifact.
fn load_blocking(
    engine: &Engine,
    artifact: &Path,
    digest: &str,
    wasm_path: &Path,
) -> Result<(Component, LoadSource), RuntimeError> {
    match cache::read(engine, artifact, digest) {
        Ok(Some(component)) => return Ok((component, LoadSource::DiskCache)),
        Ok(None) => {}
        Err(reason) => tracing::warn!(
            %digest,
            path = %artifact.display(),
            %reason,
            "ignoring cached artifact; recompiling"
        ),
    }

    let wasm = std::fs::read(wasm_path).map_err(|source| RuntimeError::ReadWasm {
        digest: digest.to_string(),
        path: wasm_path.to_path_buf(),
        source,
    })?;
    let compile_error = |e: wasmtime::Error| RuntimeError::Compile {
        digest: digest.to_string(),
        message: format!("{e:#}"),
    };
    let started = Instant::now();
    let component = Component::from_binary(engine, &wasm).map_err(compile_error)?;
    tracing::debug!(%digest, elapsed = ?started.elapsed(), bytes = wasm.len(), "compiled component");

    // A failed cache write costs a recompile after restart, nothing more.
    match component.serialize() {
        Ok(artifact_bytes) => {
            if let Err(e) = cache::write(artifact, digest, &artifact_bytes) {
                tracing::warn!(%digest, path = %artifact.display(), error = %e, "cannot write compiled artifact to the cache");
            }
        }
        Err(e) => {
            tracing::warn!(%digest, error = %format!("{e:#}"), "cannot serialize compiled component")
        }
    }
    Ok((component, LoadSource::Compiled))
}

/// An engine (with the component-model async ABI if `concurrent`), its linker and its
/// artifact directory.
fn engine_set(config: &RuntimeConfig, concurrent: bool) -> Result<EngineSet, RuntimeError> {
    let mut engine_config = engine_config(config)?;
    engine_config
        .wasm_component_model_async(concurrent)
        .concurrency_support(concurrent);
    let engine = Engine::new(&engine_config).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;

    let mut linker = Linker::new(&engine);
    let mut linked = wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker))
        .and_then(|()| wasmtime_wasi_config::add_to_linker(&mut linker, Host::wasi_config))
        .and_then(|()| crate::keyvalue::add_to_linker(&mut linker, Host::keyvalue))
        .and_then(|()| crate::volumes::add_to_linker(&mut linker));
    if concurrent {
        // WASIp2 and WASIp3 side by side, as `wasmtime serve -Scli` links them: a p3 guest
        // built with Rust's std imports p2 interfaces too.
        linked = linked
            .and_then(|()| wasmtime_wasi::p3::add_to_linker(&mut linker))
            .and_then(|()| wasmtime_wasi_http::p3::add_to_linker(&mut linker));
    }
    linked.map_err(|e| RuntimeError::Engine(format!("cannot set up the WASI linker: {e:#}")))?;

    let artifact_dir = config.cache_dir.join(cache::engine_dir_name(&engine));
    std::fs::create_dir_all(&artifact_dir).map_err(|source| RuntimeError::CacheDir {
        path: artifact_dir.clone(),
        source,
    })?;
    Ok(EngineSet {
        engine,
        linker,
        artifact_dir,
    })
}

fn engine_config(config: &RuntimeConfig) -> Result<wasmtime::Config, RuntimeError> {
    if config.max_instances == 0 {
        return Err(RuntimeError::Config(
            "max_instances must be at least 1".into(),
        ));
    }
    if config.max_memory_bytes < WASM_PAGE || config.max_memory_bytes > 1 << 32 {
        return Err(RuntimeError::Config(format!(
            "max_memory_bytes must be between 64 KiB and 4 GiB, not {}",
            format_bytes(config.max_memory_bytes)
        )));
    }
    if config.memory_budget_bytes < WASM_PAGE {
        return Err(RuntimeError::Config(format!(
            "memory_budget_bytes must be at least 64 KiB, not {}",
            format_bytes(config.memory_budget_bytes)
        )));
    }
    if config.epoch_tick.is_zero() {
        return Err(RuntimeError::Config(
            "epoch_tick must be greater than 0".into(),
        ));
    }

    // Each memory slot reserves exactly the largest memory allowed (rounded to wasm pages),
    // instead of wasmtime's 4 GiB default: with 1000 instances that is ~1 TiB of address space
    // rather than ~8 TiB, and memories can still grow in place up to the cap.
    let max_memory = config.max_memory_bytes.div_ceil(WASM_PAGE) * WASM_PAGE;
    let max_memory_usize = usize::try_from(max_memory)
        .map_err(|_| RuntimeError::Config("max_memory_bytes too large for this host".into()))?;
    let n = config.max_instances;

    let (keep_resident, scan) = memory_reset();
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .total_memories(n.saturating_mul(MEMORIES_PER_COMPONENT))
        .total_tables(n.saturating_mul(TABLES_PER_COMPONENT))
        .total_stacks(n)
        .max_memory_size(max_memory_usize)
        .linear_memory_keep_resident(keep_resident)
        .table_keep_resident(KEEP_RESIDENT_TABLE)
        .pagemap_scan(if scan {
            wasmtime::Enabled::Yes
        } else {
            wasmtime::Enabled::No
        });

    let mut c = wasmtime::Config::new();
    c.wasm_component_model(true)
        .epoch_interruption(true)
        .memory_reservation(max_memory)
        .memory_guard_size(MEMORY_GUARD_BYTES)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Ok(c)
}

/// How the pool resets a freed linear memory: the bytes it resets in place, and whether it
/// asks the kernel which pages were written (`PAGEMAP_SCAN`), used wherever the kernel has it.
pub fn memory_reset() -> (usize, bool) {
    if PoolingAllocationConfig::is_pagemap_scan_available() {
        (KEEP_RESIDENT_MEMORY_SCANNED, true)
    } else {
        (KEEP_RESIDENT_MEMORY, false)
    }
}

/// Thread advancing the engines' epoch every tick: the clock for deadlines and time slices.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn spawn(epochs: Arc<Epochs>, tick: Duration) -> Result<EpochTicker, RuntimeError> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("shoal-epoch".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Acquire) {
                        std::thread::park_timeout(tick);
                        epochs.increment();
                    }
                }
            })
            .map_err(|e| RuntimeError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::Release);
            thread.thread().unpark();
            // The thread only sleeps a tick at a time: joining is quick.
            let _ = thread.join();
        }
    }
}
