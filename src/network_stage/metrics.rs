//! What a network stage counts: [`NetworkStats`] (read by users), the shared counters behind it
//! ([`NetworkMetrics`]) and what one UDF call adds to them ([`CallStats`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a network stage has done: rows seen, images run, null rows and why, and where the time
/// went. Read with [`super::NetworkStage::metrics`] on any network stage after running a query. Counts since the stage was made or
/// loaded, or since `reset_metrics()`; clones and tuning copies of a stage count into the
/// stage the user holds.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStats {
    /// Rows of image column the stage was called on.
    pub rows: u64,
    /// Images run through the network (rows with an output).
    pub images: u64,
    /// Forward passes (each up to `batchSize` images).
    pub forward_passes: u64,
    /// Forward passes retried with half the batch after the device failed to allocate.
    pub batch_halvings: u64,
    /// Rows with a null output, by the kind of their problem ([`crate::image::ProblemKind`]:
    /// `null input`, `empty`, `truncated`, `over the decode limits`, `invalid image struct`,
    /// ...). `errorCol` gives each row's own sentence.
    pub null_rows: std::collections::BTreeMap<String, u64>,
    /// Seconds spent resizing and normalising, summed over the threads that did it.
    pub preprocess_seconds: f64,
    /// Seconds spent in forward passes (device time included), summed over partitions.
    pub network_seconds: f64,
    /// Seconds from the start of the first call to the end of the last.
    pub wall_seconds: f64,
    /// The device the network ran on (`cpu`, `wgpu`, ...), once it has run.
    pub device: String,
}

impl NetworkStats {
    /// Rows with a null output.
    pub fn null_count(&self) -> u64 {
        self.null_rows.values().sum()
    }

    /// Images per second of wall time (0 before any ran).
    pub fn images_per_second(&self) -> f64 {
        if self.wall_seconds > 0.0 {
            self.images as f64 / self.wall_seconds
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for NetworkStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows, {} images in {} forward passes on {} ({:.1} images/s); \
             preprocess {:.1} s, network {:.1} s, wall {:.1} s",
            self.rows,
            self.images,
            self.forward_passes,
            if self.device.is_empty() {
                "-"
            } else {
                &self.device
            },
            self.images_per_second(),
            self.preprocess_seconds,
            self.network_seconds,
            self.wall_seconds
        )?;
        if self.batch_halvings > 0 {
            write!(f, "; {} batch halvings", self.batch_halvings)?;
        }
        for (reason, count) in &self.null_rows {
            write!(f, "; null ({reason}): {count}")?;
        }
        Ok(())
    }
}

/// The shared, updatable counters behind [`NetworkStats`]: clones count into the same
/// counters, so a stage's clones and tuning copies add up in the stage the user holds.
#[derive(Debug, Clone, Default)]
pub struct NetworkMetrics(Arc<Mutex<Counters>>);

#[derive(Debug, Default)]
struct Counters {
    stats: NetworkStats,
    first: Option<Instant>,
}

impl NetworkMetrics {
    /// What has been counted so far.
    pub fn snapshot(&self) -> NetworkStats {
        self.with(|c| c.stats.clone())
    }

    /// Sets every counter back to zero.
    pub fn reset(&self) {
        self.with(|c| *c = Counters::default());
    }

    /// Images run through the network.
    pub fn images(&self) -> u64 {
        self.with(|c| c.stats.images)
    }

    #[cfg(test)]
    pub(crate) fn add_images(&self, images: usize) {
        self.with(|c| c.stats.images += images as u64);
    }

    fn with<T>(&self, f: impl FnOnce(&mut Counters) -> T) -> T {
        // Counters stay consistent even if a thread panicked holding the lock.
        let mut guard = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    pub(super) fn started(&self, at: Instant) {
        self.with(|c| {
            c.first.get_or_insert(at);
        });
    }

    pub(super) fn record(&self, call: &CallStats) {
        self.with(|c| {
            let s = &mut c.stats;
            s.rows += call.rows;
            s.images += call.images;
            s.forward_passes += call.forward_passes;
            s.batch_halvings += call.batch_halvings;
            s.preprocess_seconds += call.preprocess.as_secs_f64();
            s.network_seconds += call.network.as_secs_f64();
            for reason in &call.nulls {
                *s.null_rows.entry((*reason).to_string()).or_default() += 1;
            }
            if s.device.is_empty() {
                s.device.clone_from(&call.device);
            }
            if let Some(first) = c.first {
                s.wall_seconds = first.elapsed().as_secs_f64();
            }
        });
    }

    pub(super) fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// What one call of a network UDF did, added to the stage's [`NetworkMetrics`] when it ends.
#[derive(Debug, Default)]
pub(super) struct CallStats {
    pub rows: u64,
    pub images: u64,
    pub forward_passes: u64,
    pub batch_halvings: u64,
    pub preprocess: Duration,
    pub network: Duration,
    pub nulls: Vec<&'static str>,
    pub device: String,
}
