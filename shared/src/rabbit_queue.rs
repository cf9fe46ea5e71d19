//! The RabbitMQ chunk queue, for the cluster.
//!
//! One durable quorum queue per name, with
//! - persistent messages published with confirms (`publish` returns once the broker
//!   confirmed, and rides out a broker blip — a connection being recovered, a confirm
//!   that does not come — by retrying for up to 30 s);
//! - `x-delivery-limit = max_deliveries - 1`: the broker counts failed attempts in
//!   `x-delivery-count` and dead-letters a message past the limit;
//! - at-least-once dead-lettering (`x-dead-letter-strategy`, which needs
//!   `x-overflow = reject-publish`) into `<name>.dlq` through the default exchange;
//! - manual acks and a per-subscription prefetch.
//!
//! RabbitMQ 3.10 (Debian's) has no per-queue consumer timeout: chunks must finish well
//! inside the broker's `consumer_timeout` (30 minutes by default).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tracing::warn;

use crate::error::{Classify, ErrorClass};
use crate::links::LinkTls;
use crate::queue::{ChunkQueue, Delivery, QueueError, Settle, Subscription};

fn unavailable(e: lapin::Error) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

/// A chunk queue on RabbitMQ.
pub struct RabbitQueue {
    conn: Connection,
    publisher: Channel,
    name: String,
    dlq: String,
}

impl RabbitQueue {
    /// Connects (with lapin's auto-recovery) and declares the queue and its dead-letter
    /// queue.
    pub async fn connect(url: &str, name: &str, max_deliveries: u32) -> Result<Self, QueueError> {
        Self::connect_with_tls(url, name, max_deliveries, &LinkTls::default()).await
    }

    /// As [`RabbitQueue::connect`]; an `amqps://` URL trusts `tls.ca` (else the system's
    /// CAs) and presents `tls.cert`/`tls.key` when given.
    pub async fn connect_with_tls(
        url: &str,
        name: &str,
        max_deliveries: u32,
        tls: &LinkTls,
    ) -> Result<Self, QueueError> {
        let bad = |e: String| QueueError::Config(format!("amqps: {e}"));
        let config = OwnedTLSConfig {
            cert_chain: tls
                .ca_pem()
                .map_err(bad)?
                .map(|pem| String::from_utf8_lossy(&pem).into_owned()),
            identity: tls
                .identity_pem()
                .map_err(bad)?
                .map(|(pem, key)| OwnedIdentity::PKCS8 { pem, key }),
        };
        crate::links::check_server_certificate(url, tls)
            .await
            .map_err(bad)?;
        let runtime = lapin::runtime::default_runtime().map_err(unavailable)?;
        let conn = Connection::connect_with_config(
            url,
            ConnectionProperties::default().enable_auto_recover(),
            config,
            runtime,
        )
        .await
        .map_err(unavailable)?;
        let publisher = conn.create_channel().await.map_err(unavailable)?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        let dlq = format!("{name}.dlq");
        let mut quorum = FieldTable::default();
        quorum.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        publisher
            .queue_declare(dlq.as_str().into(), durable(), quorum.clone())
            .await
            .map_err(unavailable)?;
        let mut args = quorum;
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(max_deliveries.max(1)) - 1),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(dlq.as_str().into()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        publisher
            .queue_declare(name.into(), durable(), args)
            .await
            .map_err(unavailable)?;
        Ok(Self {
            conn,
            publisher,
            name: name.to_owned(),
            dlq,
        })
    }

    /// Deletes the queue and its dead-letter queue (tests and teardown).
    pub async fn delete(&self) -> Result<(), QueueError> {
        for q in [&self.name, &self.dlq] {
            self.publisher
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// What the broker says of the chunk queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueDepth {
    /// Tasks waiting to be delivered (not those delivered and unacknowledged).
    pub ready: u32,
    /// Consumers subscribed: workers taking chunks.
    pub consumers: u32,
}

impl RabbitQueue {
    /// The chunk queue's ready tasks and consumers: a passive declare, on a channel of its
    /// own (the broker closes the channel of a passive declare whose queue is gone: that
    /// must not be the publisher's). Asked at each scrape and readiness probe.
    pub async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let channel = self.conn.create_channel().await.map_err(unavailable)?;
        let declared = channel
            .queue_declare(
                self.name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        if channel.status().connected() {
            let _ = channel.close(200, "OK".into()).await;
        }
        let q = declared.map_err(unavailable)?;
        Ok(QueueDepth {
            ready: q.message_count(),
            consumers: q.consumer_count(),
        })
    }

    /// A consumer of `queue` on a channel of its own.
    async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Subscription>, QueueError> {
        let channel = self.conn.create_channel().await.map_err(unavailable)?;
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await
            .map_err(unavailable)?;
        let tag = format!("haul-{}", uuid::Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        Ok(Box::new(RabbitSubscription {
            channel,
            consumer,
            tag,
        }))
    }
}

/// How long a publish keeps trying through a broker blip (a connection closed and being
/// recovered, a confirm that does not come) before its caller hears that the queue is
/// unavailable. A task published twice (its first confirm lost) is harmless: a chunk
/// commits once.
const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(30);
/// How long one publish waits for the broker's confirm (a broker under a memory or disk
/// alarm blocks publishers).
const CONFIRM_WAIT: Duration = Duration::from_secs(10);

impl RabbitQueue {
    /// One publish, answered by the broker's confirm.
    async fn publish_once(&self, body: &[u8]) -> Result<(), QueueError> {
        let confirmed = async {
            self.publisher
                .basic_publish(
                    "".into(),
                    self.name.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await
        };
        let confirm = tokio::time::timeout(CONFIRM_WAIT, confirmed)
            .await
            .map_err(|_| {
                QueueError::Unavailable(format!(
                    "no confirm from the broker within {CONFIRM_WAIT:?} (is it under a memory or disk alarm?)"
                ))
            })?
            .map_err(unavailable)?;
        if confirm.is_ack() {
            Ok(())
        } else {
            Err(QueueError::Unavailable(format!(
                "the broker refused a message for {}",
                self.name
            )))
        }
    }
}

#[async_trait]
impl ChunkQueue for RabbitQueue {
    /// Publishes with confirms, retrying with backoff for up to [`PUBLISH_RETRY_FOR`]
    /// while the broker cannot take it (lapin recovers a closed connection meanwhile).
    async fn publish(&self, body: Bytes) -> Result<(), QueueError> {
        let until = Instant::now() + PUBLISH_RETRY_FOR;
        (|| self.publish_once(&body))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .without_max_times(),
            )
            .when(|e| e.class() == ErrorClass::Transient && Instant::now() < until)
            .notify(|e, wait| {
                warn!(queue = %self.name, error = %e, wait_ms = wait.as_millis() as u64, "publishing a chunk task failed; retrying");
            })
            .await
    }

    async fn subscribe(&self, prefetch: u16) -> Result<Box<dyn Subscription>, QueueError> {
        self.consume(&self.name, prefetch).await
    }

    async fn subscribe_dead_letters(
        &self,
        prefetch: u16,
    ) -> Result<Box<dyn Subscription>, QueueError> {
        self.consume(&self.dlq, prefetch).await
    }

    async fn ready_count(&self) -> Result<usize, QueueError> {
        Ok(self.depth().await?.ready as usize)
    }

    #[cfg(any(test, feature = "testsuite"))]
    async fn drain_dead_letters(&self) -> Result<Vec<Bytes>, QueueError> {
        let mut out = Vec::new();
        while let Some(m) = self
            .publisher
            .basic_get(
                self.dlq.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .map_err(unavailable)?
        {
            out.push(Bytes::from(m.delivery.data.clone()));
        }
        Ok(out)
    }
}

struct RabbitSubscription {
    channel: Channel,
    consumer: Consumer,
    tag: String,
}

#[async_trait]
impl Subscription for RabbitSubscription {
    async fn next(&mut self) -> Result<Delivery, QueueError> {
        let d = match self.consumer.next().await {
            Some(d) => d.map_err(unavailable)?,
            None => return Err(QueueError::Unavailable("the consumer was cancelled".into())),
        };
        let count = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| {
                h.inner()
                    .get(&ShortString::from("x-delivery-count"))
                    .cloned()
            })
            .and_then(|v| match v {
                AMQPValue::LongLongInt(n) => Some(n),
                AMQPValue::LongInt(n) => Some(i64::from(n)),
                AMQPValue::ShortInt(n) => Some(i64::from(n)),
                _ => None,
            })
            .unwrap_or(0);
        let body = Bytes::from(d.data.clone());
        Ok(Delivery::new(
            body,
            count as u32 + 1,
            Box::new(RabbitSettle {
                acker: Some(d.acker),
            }),
        ))
    }

    /// `basic.cancel`, then every delivery already pushed to this consumer goes back with
    /// a nack. The channel stays open, so deliveries taken before can still be acked.
    async fn cancel(&mut self) -> Result<(), QueueError> {
        self.channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await
            .map_err(unavailable)?;
        // after cancel-ok the stream ends; what it still yields was prefetched
        let handed_back = async {
            while let Some(Ok(d)) = self.consumer.next().await {
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), handed_back).await;
        Ok(())
    }
}

impl Drop for RabbitSubscription {
    /// Closing the channel returns its unsettled messages to the queue.
    fn drop(&mut self) {
        let channel = self.channel.clone();
        tokio::spawn(async move {
            let _ = channel.close(200, "subscription dropped".into()).await;
        });
    }
}

struct RabbitSettle {
    acker: Option<lapin::Acker>,
}

/// lapin answers `Ok(false)` when it could not send a settlement (the delivery belongs to
/// a channel that was recovered after a connection loss): the broker will redeliver.
fn sent(r: lapin::Result<bool>) -> Result<(), QueueError> {
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(QueueError::Unavailable(
            "settlement not sent (channel recovered); the message will be redelivered".into(),
        )),
        Err(e) => Err(unavailable(e)),
    }
}

#[async_trait]
impl Settle for RabbitSettle {
    async fn ack(mut self: Box<Self>) -> Result<(), QueueError> {
        let a = self.acker.take().expect("settled once");
        sent(a.ack(BasicAckOptions::default()).await)
    }
    async fn nack(mut self: Box<Self>) -> Result<(), QueueError> {
        let a = self.acker.take().expect("settled once");
        sent(
            a.nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await,
        )
    }
    async fn reject(mut self: Box<Self>) -> Result<(), QueueError> {
        let a = self.acker.take().expect("settled once");
        sent(a.reject(BasicRejectOptions { requeue: false }).await)
    }
}

impl Drop for RabbitSettle {
    /// Dropped unsettled: hand the message back (a failed attempt).
    fn drop(&mut self) {
        if let Some(a) = self.acker.take() {
            tokio::spawn(async move {
                let _ = a
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            });
        }
    }
}
