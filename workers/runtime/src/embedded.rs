//! The embedded broker: librdkafka's built-in mock cluster, for `twophase dev` and for tests on
//! a machine with no Kafka. It keeps messages in memory only and does not serve the
//! CreateTopics admin call, so topics are made here, before any worker starts.

use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::mocking::MockCluster;

/// A running mock cluster. Its brokers listen on loopback; other processes reach it through
/// [`bootstrap_servers`](EmbeddedBroker::bootstrap_servers). Dropping it stops it.
#[derive(Debug)]
pub struct EmbeddedBroker {
    bootstrap: String,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts a one-broker cluster with `topics` made, each with `partitions` partitions.
    pub fn start(topics: &[String], partitions: i32) -> anyhow::Result<EmbeddedBroker> {
        let topics = topics.to_vec();
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        // The cluster is not `Send`: it lives and dies on this one thread.
        let thread = std::thread::Builder::new()
            .name("embedded-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(cluster) => cluster,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                for topic in &topics {
                    if let Err(e) = cluster.create_topic(topic, partitions, 1) {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("creating {topic}: {e}")));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Runs until stopped or until the handle is dropped.
                let _ = stop_rx.recv();
            })?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the embedded broker thread died while starting"))??;
        Ok(EmbeddedBroker {
            bootstrap,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
