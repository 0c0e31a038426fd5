//! [`Engine`] on NATS: JetStream key-value buckets (`allot-<cluster>-members`,
//! `…-election`, `…-config`, history 1, `max_age` = the lease) and core NATS subjects for
//! the per-window messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::config::ClusterConfig;
use crate::engine::{Bucket, Engine, EngineError, Entry, Lifetimes};

/// How long connecting may take before it is an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request to JetStream may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Depth of each watch and subscription channel.
const CHANNEL_DEPTH: usize = 1024;

fn unavailable(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

/// The engine on a NATS cluster.
#[derive(Clone)]
pub struct NatsEngine {
    client: async_nats::Client,
    stores: [kv::Store; 3],
    /// Connections lost so far (disconnected, or the server entering lame-duck mode).
    interruptions: Arc<AtomicU64>,
}

impl std::fmt::Debug for NatsEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsEngine").finish_non_exhaustive()
    }
}

impl NatsEngine {
    /// Connects with `config`'s servers and credentials and opens (or creates) the
    /// cluster's buckets with `lifetimes`.
    pub async fn connect(
        config: &ClusterConfig,
        lifetimes: Lifetimes,
    ) -> Result<NatsEngine, EngineError> {
        let interruptions = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&interruptions);
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("allot {}", config.name))
            .event_callback(move |event| {
                if matches!(
                    event,
                    async_nats::Event::Disconnected | async_nats::Event::LameDuckMode
                ) {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                std::future::ready(())
            })
            .connection_timeout(CONNECT_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT));
        if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        if let Some(path) = &config.nkey_file {
            let seed = std::fs::read_to_string(path).map_err(|e| {
                EngineError::Unavailable(format!("`cluster.nkey_file` {}: {e}", path.display()))
            })?;
            options = options.nkey(seed.trim().to_string());
        }
        if config.tls || config.tls_ca_file.is_some() {
            options = options.require_tls(true);
        }
        if let Some(ca) = &config.tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        let servers: Vec<async_nats::ServerAddr> = config
            .servers
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|e| EngineError::Unavailable(format!("`cluster.servers` `{s}`: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let client = tokio::time::timeout(CONNECT_TIMEOUT * 2, options.connect(servers))
            .await
            .map_err(|_| unavailable("connecting to NATS timed out"))?
            .map_err(unavailable)?;
        let js = jetstream::new(client.clone());
        let mut stores = Vec::with_capacity(3);
        for bucket in Bucket::ALL {
            let name = format!("allot-{}-{}", config.name, bucket.suffix());
            let store = match js.get_key_value(name.clone()).await {
                Ok(store) => store,
                Err(_) => js
                    .create_key_value(kv::Config {
                        bucket: name.clone(),
                        history: 1,
                        max_age: lifetimes.of(bucket),
                        num_replicas: config.replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| unavailable(format!("bucket {name}: {e}")))?,
            };
            stores.push(store);
        }
        let stores: [kv::Store; 3] = stores
            .try_into()
            .map_err(|_| unavailable("three buckets expected"))?;
        Ok(NatsEngine {
            client,
            stores,
            interruptions,
        })
    }

    fn store(&self, bucket: Bucket) -> &kv::Store {
        match bucket {
            Bucket::Members => &self.stores[0],
            Bucket::Election => &self.stores[1],
            Bucket::Config => &self.stores[2],
        }
    }
}

fn live(entry: kv::Entry) -> Option<Entry> {
    (entry.operation == kv::Operation::Put).then(|| Entry {
        key: entry.key,
        value: entry.value,
        revision: entry.revision,
    })
}

impl Engine for NatsEngine {
    async fn create(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
    ) -> Result<Option<u64>, EngineError> {
        match self.store(bucket).create(key, value).await {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn update(
        &self,
        bucket: Bucket,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Option<u64>, EngineError> {
        match self.store(bucket).update(key, value, revision).await {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn put(&self, bucket: Bucket, key: &str, value: Bytes) -> Result<u64, EngineError> {
        self.store(bucket)
            .put(key, value)
            .await
            .map_err(unavailable)
    }

    async fn get(&self, bucket: Bucket, key: &str) -> Result<Option<Entry>, EngineError> {
        Ok(self
            .store(bucket)
            .entry(key)
            .await
            .map_err(unavailable)?
            .and_then(live))
    }

    async fn entries(&self, bucket: Bucket) -> Result<Vec<Entry>, EngineError> {
        let store = self.store(bucket);
        let mut keys = store.keys().await.map_err(unavailable)?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(unavailable)?);
        }
        let mut out = Vec::with_capacity(names.len());
        for k in names {
            if let Some(e) = store.entry(k).await.map_err(unavailable)?.and_then(live) {
                out.push(e);
            }
        }
        Ok(out)
    }

    async fn delete(&self, bucket: Bucket, key: &str) -> Result<(), EngineError> {
        self.store(bucket).delete(key).await.map_err(unavailable)
    }

    async fn watch(&self, bucket: Bucket) -> Result<mpsc::Receiver<Entry>, EngineError> {
        let mut w = self.store(bucket).watch_all().await.map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        tokio::spawn(async move {
            while let Some(item) = w.next().await {
                let Ok(entry) = item else {
                    continue;
                };
                let e = Entry {
                    key: entry.key.clone(),
                    value: if entry.operation == kv::Operation::Put {
                        entry.value
                    } else {
                        Bytes::new()
                    },
                    revision: entry.revision,
                };
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), EngineError> {
        self.client
            .publish(subject.to_string(), payload)
            .await
            .map_err(unavailable)
    }

    fn interruptions(&self) -> u64 {
        self.interruptions.load(Ordering::Relaxed)
    }

    async fn subscribe(&self, subject: &str) -> Result<mpsc::Receiver<Bytes>, EngineError> {
        let mut sub = self
            .client
            .subscribe(subject.to_string())
            .await
            .map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if tx.send(msg.payload).await.is_err() {
                    return; // the reader is gone: dropping `sub` unsubscribes
                }
            }
        });
        Ok(rx)
    }
}
