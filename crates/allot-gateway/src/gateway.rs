//! The gateway as the binary and the admin API hold it: the live state, and the
//! supervisor of its loops. Every change goes through [`Gateway::apply`] (or
//! [`Gateway::change`]): the whole new snapshot is built and swapped in, then the loops
//! are brought in line with it.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::control::qos::Readout;
use crate::control::Supervisor;
use crate::runtime::{Live, Runtime};
use crate::stats::Status;

/// A gateway: shared by every listener, the admin API and the binary.
#[derive(Clone, Debug)]
pub struct Gateway {
    live: Arc<Live>,
    supervisor: Arc<Supervisor>,
}

impl Gateway {
    /// A gateway in the state `config` describes (already validated by [`Config::parse`]),
    /// its loops started when called inside a tokio runtime.
    pub fn new(config: Config) -> Result<Gateway, ConfigError> {
        let live = Live::new(config)?;
        let supervisor = Arc::new(Supervisor::default());
        supervisor.reconcile(&live);
        Ok(Gateway { live, supervisor })
    }

    /// Makes `config` the configuration in force, keeping waiting and running requests.
    /// On error nothing changes.
    pub fn apply(&self, config: Config) -> Result<(), ConfigError> {
        self.live.apply(config)?;
        self.supervisor.reconcile(&self.live);
        Ok(())
    }

    /// Validates `edit` applied to a copy of the configuration in force, then applies it.
    /// On any error nothing changes.
    pub fn change(
        &self,
        edit: impl FnOnce(&mut Config) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        self.live.change(edit)?;
        self.supervisor.reconcile(&self.live);
        Ok(())
    }

    /// The snapshot in force.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.live.load()
    }

    /// A snapshot of every sensor.
    pub fn status(&self) -> Status {
        self.live.status()
    }

    /// Every controller's last readout.
    pub fn readouts(&self) -> Vec<Readout> {
        self.supervisor.readouts()
    }

    /// Reopens the access log's file (after logrotate moved it; SIGUSR1).
    pub fn reopen_logs(&self) {
        if let Some(log) = &self.live.load().access_log {
            log.reopen();
        }
    }

    /// How long requests in flight get to finish when the gateway stops.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.live.load().config.gateway.shutdown_grace_ms)
    }

    /// The live state, for the listeners.
    pub(crate) fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// The supervisor of the loops.
    pub(crate) fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }
}
