//! The chunk queue: how chunk tasks reach workers.
//!
//! # Contract
//! - [`ChunkQueue::publish`] returns only once the message is durable (for RabbitMQ: the
//!   publisher confirm arrived). A message is delivered at least once.
//! - A subscription holds at most `prefetch` unsettled deliveries.
//! - Each delivery carries its attempt number, starting at 1. A delivery that is nacked, or
//!   dropped unsettled (worker died, channel closed), returns to the queue and counts as a
//!   failed attempt; after `max_deliveries` failed attempts the message is dead-lettered
//!   instead. [`Delivery::reject`] dead-letters at once (a permanent error).
//! - Settling is idempotent from the worker's point of view: every commit it guards must be
//!   safe to repeat, because an ack can be lost and the message redelivered.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::error::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("queue protocol error: {0}")]
    Protocol(String),
    /// The link cannot be set up as configured (a certificate file that cannot be read).
    #[error("queue: {0}")]
    Config(String),
}

impl Classify for QueueError {
    fn class(&self) -> ErrorClass {
        match self {
            QueueError::Unavailable(_) => ErrorClass::Transient,
            QueueError::Protocol(_) => ErrorClass::Internal,
            QueueError::Config(_) => ErrorClass::User,
        }
    }
}

#[async_trait]
pub trait ChunkQueue: Send + Sync + 'static {
    /// Enqueues one message; `Ok` means it is durable.
    async fn publish(&self, body: Bytes) -> Result<(), QueueError>;
    /// Starts consuming with at most `prefetch` unsettled deliveries.
    async fn subscribe(&self, prefetch: u16) -> Result<Box<dyn Subscription>, QueueError>;
    /// Consumes the dead-letter queue, the same way: an ack removes a dead letter, a nack
    /// (or a drop) puts it back. The coordinator consumes it, so that every chunk task
    /// the queue gave up on is seen and its job ends.
    async fn subscribe_dead_letters(
        &self,
        prefetch: u16,
    ) -> Result<Box<dyn Subscription>, QueueError>;
    /// Messages ready for delivery (not counting unsettled ones).
    async fn ready_count(&self) -> Result<usize, QueueError>;
    /// Takes the dead-lettered messages out of the dead-letter queue.
    #[cfg(any(test, feature = "testsuite"))]
    async fn drain_dead_letters(&self) -> Result<Vec<Bytes>, QueueError>;
}

#[async_trait]
pub trait Subscription: Send {
    /// The next delivery, waiting for one (and for a free prefetch slot). Cancel-safe.
    async fn next(&mut self) -> Result<Delivery, QueueError>;
    /// Stops new deliveries and hands back what was delivered to this subscription but
    /// not yet returned by [`Subscription::next`]. Deliveries already taken stay with the
    /// caller and can still be settled. After it, `next` returns an error.
    async fn cancel(&mut self) -> Result<(), QueueError>;
}

/// Settles a delivery. Implementations must treat a drop without settling as a nack.
#[async_trait]
pub trait Settle: Send {
    async fn ack(self: Box<Self>) -> Result<(), QueueError>;
    async fn nack(self: Box<Self>) -> Result<(), QueueError>;
    async fn reject(self: Box<Self>) -> Result<(), QueueError>;
}

/// One delivered message.
pub struct Delivery {
    pub body: Bytes,
    /// 1 on first delivery; incremented by every failed attempt.
    pub attempt: u32,
    settle: Box<dyn Settle>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("attempt", &self.attempt)
            .field("len", &self.body.len())
            .finish()
    }
}

impl Delivery {
    pub fn new(body: Bytes, attempt: u32, settle: Box<dyn Settle>) -> Self {
        Self {
            body,
            attempt,
            settle,
        }
    }
    /// Done: remove the message for good.
    pub async fn ack(self) -> Result<(), QueueError> {
        self.settle.ack().await
    }
    /// Failed, may succeed later: requeue (or dead-letter past the delivery limit).
    pub async fn nack(self) -> Result<(), QueueError> {
        self.settle.nack().await
    }
    /// Failed permanently: dead-letter now.
    pub async fn reject(self) -> Result<(), QueueError> {
        self.settle.reject().await
    }
}

/// The in-process queue used by `haul run`.
#[derive(Clone)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    notify: Notify,
    max_deliveries: u32,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Msg>,
    dead: VecDeque<Bytes>,
}

struct Msg {
    body: Bytes,
    failed_attempts: u32,
}

impl MemoryQueue {
    /// A queue that dead-letters a message after `max_deliveries` failed attempts.
    pub fn new(max_deliveries: u32) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                notify: Notify::new(),
                max_deliveries: max_deliveries.max(1),
            }),
        }
    }
}

impl Shared {
    fn push(&self, msg: Msg) {
        self.state.lock().expect("queue lock").ready.push_back(msg);
        self.notify.notify_waiters();
    }

    fn fail(&self, mut msg: Msg) {
        msg.failed_attempts += 1;
        if msg.failed_attempts >= self.max_deliveries {
            self.bury(msg.body);
        } else {
            self.push(msg);
        }
    }

    fn bury(&self, body: Bytes) {
        self.state.lock().expect("queue lock").dead.push_back(body);
        self.notify.notify_waiters();
    }
}

#[async_trait]
impl ChunkQueue for MemoryQueue {
    async fn publish(&self, body: Bytes) -> Result<(), QueueError> {
        self.shared.push(Msg {
            body,
            failed_attempts: 0,
        });
        Ok(())
    }

    async fn subscribe(&self, prefetch: u16) -> Result<Box<dyn Subscription>, QueueError> {
        Ok(Box::new(MemorySubscription {
            shared: Arc::clone(&self.shared),
            slots: Arc::new(Semaphore::new(prefetch.max(1) as usize)),
            dead: false,
        }))
    }

    async fn subscribe_dead_letters(
        &self,
        prefetch: u16,
    ) -> Result<Box<dyn Subscription>, QueueError> {
        Ok(Box::new(MemorySubscription {
            shared: Arc::clone(&self.shared),
            slots: Arc::new(Semaphore::new(prefetch.max(1) as usize)),
            dead: true,
        }))
    }

    async fn ready_count(&self) -> Result<usize, QueueError> {
        Ok(self.shared.state.lock().expect("queue lock").ready.len())
    }

    #[cfg(any(test, feature = "testsuite"))]
    async fn drain_dead_letters(&self) -> Result<Vec<Bytes>, QueueError> {
        Ok(std::mem::take(&mut self.shared.state.lock().expect("queue lock").dead).into())
    }
}

struct MemorySubscription {
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    /// Consumes the dead letters instead of the ready messages.
    dead: bool,
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Result<Delivery, QueueError> {
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| QueueError::Protocol("subscription closed".into()))?;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let msg = {
                let mut st = self.shared.state.lock().expect("queue lock");
                if self.dead {
                    st.dead.pop_front().map(|body| Msg {
                        body,
                        failed_attempts: 0,
                    })
                } else {
                    st.ready.pop_front()
                }
            };
            if let Some(msg) = msg {
                let attempt = msg.failed_attempts + 1;
                let body = msg.body.clone();
                let settle = MemorySettle {
                    shared: Arc::clone(&self.shared),
                    msg: Some(msg),
                    dead: self.dead,
                    _permit: permit,
                };
                return Ok(Delivery::new(body, attempt, Box::new(settle)));
            }
            notified.await;
        }
    }

    /// Nothing is delivered ahead of `next` here, so there is nothing to hand back.
    async fn cancel(&mut self) -> Result<(), QueueError> {
        self.slots.close();
        Ok(())
    }
}

struct MemorySettle {
    shared: Arc<Shared>,
    msg: Option<Msg>,
    /// A dead letter: a nack or a drop puts it back among the dead.
    dead: bool,
    _permit: OwnedSemaphorePermit,
}

impl MemorySettle {
    fn give_back(&mut self) {
        if let Some(msg) = self.msg.take() {
            if self.dead {
                self.shared.bury(msg.body);
            } else {
                self.shared.fail(msg);
            }
        }
    }
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(mut self: Box<Self>) -> Result<(), QueueError> {
        self.msg = None;
        Ok(())
    }
    async fn nack(mut self: Box<Self>) -> Result<(), QueueError> {
        self.give_back();
        Ok(())
    }
    async fn reject(mut self: Box<Self>) -> Result<(), QueueError> {
        if let Some(msg) = self.msg.take()
            && !self.dead
        {
            self.shared.bury(msg.body);
        }
        Ok(())
    }
}

impl Drop for MemorySettle {
    /// Dropped unsettled = the consumer went away: the message returns, as on a closed
    /// AMQP channel, and the attempt counts as failed.
    fn drop(&mut self) {
        self.give_back();
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_queue_conforms() {
        crate::conformance::queue_suite(|max| async move { super::MemoryQueue::new(max) }).await;
    }
}
