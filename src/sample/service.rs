//! The order service: business rules between HTTP and storage. Creating an
//! order validates it, stores it as pending and publishes `order.confirmed`
//! on an in-process queue; a worker does the slow part (the confirmation
//! e-mail, the inventory reservation) off the request path and marks the
//! order confirmed, so `POST` answers quickly. On shutdown the worker is
//! given until a deadline to confirm what is still queued ([`OrderService::drain`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::model::{NewOrder, Order, OrderConfirmed, OrderStatus};
use super::repository::OrderRepository;
use crate::server::shutdown::{self, Shutdown, Trigger};

/// Time each simulated slow step takes in the worker.
const SLOW_STEP: Duration = Duration::from_millis(25);

/// Largest `amount_cents`: JavaScript's `Number.MAX_SAFE_INTEGER`.
const MAX_AMOUNT_CENTS: u64 = (1 << 53) - 1;

/// Confirmations the worker has under way at once, as a queue consumer's
/// pool would: about 640 a second, where one at a time managed 20 and a
/// burst of orders waited tens of seconds to be confirmed.
const CONFIRMING: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// Said as the JSON checks before it are: `invalid order: ...`.
    #[error("invalid order: {0}")]
    Invalid(&'static str),
    #[error("user not found")]
    UnknownUser,
    #[error("order not found")]
    UnknownOrder,
    /// [`MAX_PENDING`] orders wait for their confirmation.
    #[error("too many orders waiting to be confirmed; try again in a second")]
    Busy,
}

#[derive(Debug, Clone)]
pub struct OrderService {
    repo: Arc<dyn OrderRepository>,
    queue: mpsc::UnboundedSender<OrderConfirmed>,
    /// Events published and not yet confirmed by the worker.
    pending: Arc<AtomicUsize>,
    worker: Arc<WorkerHandle>,
}

/// What [`OrderService::drain`] needs to stop the worker: shared by every
/// clone of the service, used once.
#[derive(Debug)]
struct WorkerHandle {
    close: Trigger,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// The longest sku, in characters.
const MAX_SKU_CHARS: usize = 64;

/// The most items an order may hold: each rides along in every later list
/// of the user's, and 100,000 of them (a 2 MB body) made a 44 MB list
/// (backend53 M1).
pub const MAX_ITEMS: usize = 100;

/// The most orders published and not yet confirmed: past it a new order
/// is refused (503, `Retry-After: 1`) rather than queued without bound,
/// as a broker with a full queue pushes back (backend53 M1: the queue
/// grew with every order a flood sent faster than the worker confirms,
/// about 640 a second).
pub const MAX_PENDING: usize = 10_000;

/// What an order's email must be, said when it is not.
const EMAIL_RULE: &str = "email must be an address (one @, no spaces, at most 254 characters)";

/// The longest email address, in bytes (RFC 5321 §4.5.3.1.3).
const MAX_EMAIL_BYTES: usize = 254;

/// The rules a new order must meet.
pub fn validate(order: &NewOrder) -> Result<(), ServiceError> {
    if order.items.is_empty() {
        return Err(ServiceError::Invalid("items must not be empty"));
    }
    if order.items.len() > MAX_ITEMS {
        return Err(ServiceError::Invalid("an order holds at most 100 items"));
    }
    if order.items.iter().any(|item| item.sku.trim().is_empty()) {
        return Err(ServiceError::Invalid("every item needs a sku"));
    }
    // A stock-keeping code, shown in lists and logs: printable, and short
    // (a 1 MiB one would ride along in every later list of the user's).
    let sku_ok =
        |sku: &str| sku.chars().count() <= MAX_SKU_CHARS && !sku.chars().any(char::is_control);
    if !order.items.iter().all(|item| sku_ok(&item.sku)) {
        return Err(ServiceError::Invalid(
            "a sku is at most 64 characters, none of them control characters",
        ));
    }
    if order.items.iter().any(|item| item.qty == 0) {
        return Err(ServiceError::Invalid("qty must be at least 1"));
    }
    // The amount is what the customer pays for the items; the model has no
    // discounts or free items that could make it zero.
    if order.amount_cents == 0 {
        return Err(ServiceError::Invalid("amount_cents must be at least 1"));
    }
    // What a JSON number holds exactly in every client (2^53 - 1).
    if order.amount_cents > MAX_AMOUNT_CENTS {
        return Err(ServiceError::Invalid(
            "amount_cents must be at most 9007199254740991",
        ));
    }
    // As stored: checked trimmed, an address padded with spaces, CR/LF or
    // megabytes of blanks went through (review41c F3).
    let email = order.email.as_str();
    // The worker mails it: no spaces or control characters, which would
    // let an address carry header lines of its own.
    let clean = !email.chars().any(|c| c.is_whitespace() || c.is_control());
    // One `@` between a local part and a domain; 254 bytes at most, what
    // a mail path holds (RFC 5321 §4.5.3.1.3): a 100 KB address rode along
    // in every later list of the user's (review35c 5).
    let shaped = email.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty() && !domain.is_empty() && !domain.contains('@')
    });
    if !(clean && shaped && email.len() <= MAX_EMAIL_BYTES) {
        return Err(ServiceError::Invalid(EMAIL_RULE));
    }
    Ok(())
}

impl OrderService {
    /// Starts the service and its worker on the current runtime. The worker
    /// ends after [`drain`](Self::drain), or once the last service clone is
    /// dropped and the queue is empty.
    pub fn start(repo: Arc<dyn OrderRepository>) -> Self {
        let (queue, events) = mpsc::unbounded_channel();
        let (close, closing) = shutdown::channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(worker(repo.clone(), events, closing, pending.clone()));
        OrderService {
            repo,
            queue,
            pending,
            worker: Arc::new(WorkerHandle {
                close,
                task: Mutex::new(Some(task)),
            }),
        }
    }

    pub fn orders_of(&self, user_id: u64) -> Result<(Vec<Order>, u64), ServiceError> {
        self.repo
            .orders_of(user_id)
            .ok_or(ServiceError::UnknownUser)
    }

    pub fn order(&self, order_id: &str) -> Result<Order, ServiceError> {
        self.repo.order(order_id).ok_or(ServiceError::UnknownOrder)
    }

    pub fn create(&self, user_id: u64, new: NewOrder) -> Result<Order, ServiceError> {
        validate(&new)?;
        // A place in the queue, taken before the order is stored (so the
        // worker never finishes an event that is not counted yet) and as
        // one step with the check: checked apart, concurrent orders each
        // passed it (review57 L6).
        // With the queue full the user is not looked up: 503 for anyone.
        self.pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_PENDING).then_some(n + 1)
            })
            .map_err(|_| ServiceError::Busy)?;
        let Some(order) = self.repo.insert(user_id, new) else {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(ServiceError::UnknownUser);
        };
        let event = OrderConfirmed {
            order_id: order.id.clone(),
            email: order.email.clone(),
        };
        if self.queue.send(event).is_err() {
            // Only after the drain began (a request that outlived the
            // shutdown grace); the order stays pending.
            self.pending.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(order = %order.id, "order.confirmed queue closed");
        }
        Ok(order)
    }

    /// Confirmations published and not yet done.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// For shutdown, once no more requests are being served: closes the
    /// queue and lets the worker confirm what is in it until `deadline`,
    /// then stops it. Logs the outcome and returns how many confirmations
    /// were left undone (0: drained). Later calls return at once.
    pub async fn drain(&self, deadline: Instant) -> usize {
        let task = self
            .worker
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut task) = task else {
            return self.pending();
        };
        let queued = self.pending();
        if queued > 0 {
            // Said as it begins: confirming thousands takes seconds in
            // which nothing else is said, and a second Ctrl-C came
            // (review35c 4).
            tracing::info!(queued, "confirming the queued orders before exiting");
        }
        self.worker.close.fire();
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            // Returns at the worker's next await: the count is final after it.
            let _ = task.await;
        }
        let left = self.pending();
        if left == 0 && queued == 0 {
            tracing::debug!("order.confirmed queue was empty");
        } else if left == 0 {
            tracing::info!(confirmed = queued, "order.confirmed queue drained");
        } else {
            tracing::warn!(
                pending = left,
                "order.confirmed queue not drained within the shutdown grace: \
                 {left} confirmations still pending, those orders stay pending"
            );
        }
        left
    }
}

async fn worker(
    repo: Arc<dyn OrderRepository>,
    mut events: mpsc::UnboundedReceiver<OrderConfirmed>,
    mut closing: Shutdown,
    pending: Arc<AtomicUsize>,
) {
    use futures_util::StreamExt;
    let mut confirming = futures_util::stream::FuturesUnordered::new();
    let mut open = true;
    let mut queued = true;
    while queued || !confirming.is_empty() {
        tokio::select! {
            event = events.recv(), if queued && confirming.len() < CONFIRMING => {
                match event {
                    Some(event) => confirming.push(async {
                        let event = event;
                        confirm(repo.as_ref(), &event).await;
                        // Counted as each one ends: an abort at the drain's
                        // deadline leaves the count exact.
                        pending.fetch_sub(1, Ordering::SeqCst);
                    }),
                    None => queued = false,
                }
            }
            Some(()) = confirming.next(), if !confirming.is_empty() => {}
            // Closing refuses new events; recv still yields the queued ones,
            // then None.
            _ = closing.recv(), if open => {
                events.close();
                open = false;
            }
        }
    }
}

/// The slow part: e-mail the customer, reserve the stock.
async fn confirm(repo: &dyn OrderRepository, event: &OrderConfirmed) {
    tokio::time::sleep(SLOW_STEP).await;
    // Not the address: a customer's e-mail has no place in a log.
    tracing::debug!(order = %event.order_id, "confirmation e-mail sent");
    tokio::time::sleep(SLOW_STEP).await;
    tracing::debug!(order = %event.order_id, "inventory reserved");
    repo.set_status(&event.order_id, OrderStatus::Confirmed);
}

#[cfg(test)]
mod tests {
    use super::super::model::OrderItem;
    use super::*;

    fn order(items: &[(&str, u32)], email: &str) -> NewOrder {
        NewOrder {
            items: items
                .iter()
                .map(|(sku, qty)| OrderItem {
                    sku: (*sku).into(),
                    qty: *qty,
                })
                .collect(),
            amount_cents: 1999,
            email: email.into(),
        }
    }

    #[test]
    fn validation_rules() {
        let cases: &[(NewOrder, Result<(), &str>)] = &[
            (order(&[("A-1", 2)], "a@example.com"), Ok(())),
            (order(&[], "a@example.com"), Err("items must not be empty")),
            (
                order(&[("", 1)], "a@example.com"),
                Err("every item needs a sku"),
            ),
            (
                order(&[("A-1", 0)], "a@example.com"),
                Err("qty must be at least 1"),
            ),
            (order(&[("A-1", 1)], "nobody"), Err(EMAIL_RULE)),
            (order(&[("A-1", 1)], "@example.com"), Err(EMAIL_RULE)),
            (order(&[("A-1", 1)], "a@b.c\r\nBcc: x@y.z"), Err(EMAIL_RULE)),
            (order(&[("A-1", 1)], "a b@example.com"), Err(EMAIL_RULE)),
            (order(&[("A-1", 1)], "a@@b"), Err(EMAIL_RULE)),
            // Checked as stored: padding is not trimmed away (review41c F3).
            (order(&[("A-1", 1)], " a@b.c"), Err(EMAIL_RULE)),
            (order(&[("A-1", 1)], "a@b.c\r\n"), Err(EMAIL_RULE)),
            (order(&[("A-1", 1)], "a@b.c\t"), Err(EMAIL_RULE)),
            (
                order(&[("A-1", 1)], &format!("{}a@b.c", " ".repeat(300))),
                Err(EMAIL_RULE),
            ),
            (
                order(&[("A-1", 1)], &format!("{}@example.com", "a".repeat(250))),
                Err(EMAIL_RULE),
            ),
            (
                NewOrder {
                    amount_cents: MAX_AMOUNT_CENTS + 1,
                    ..order(&[("A-1", 1)], "a@example.com")
                },
                Err("amount_cents must be at most 9007199254740991"),
            ),
            (
                NewOrder {
                    amount_cents: 0,
                    ..order(&[("A-1", 1)], "a@example.com")
                },
                Err("amount_cents must be at least 1"),
            ),
            (
                NewOrder {
                    amount_cents: 1,
                    ..order(&[("A-1", 1)], "a@example.com")
                },
                Ok(()),
            ),
        ];
        for (input, want) in cases {
            let got = validate(input).map_err(|e| match e {
                ServiceError::Invalid(m) => m,
                other => panic!("{other:?}"),
            });
            assert_eq!(got, *want, "{input:?}");
        }
        // Said as the JSON checks' refusals are (review35f 4).
        let zero = order(&[("A-1", 0)], "a@example.com");
        assert_eq!(
            validate(&zero).unwrap_err().to_string(),
            "invalid order: qty must be at least 1"
        );
    }

    fn seeded_service() -> OrderService {
        OrderService::start(Arc::new(
            super::super::repository::InMemoryRepository::seeded(),
        ))
    }

    fn statuses(service: &OrderService, ids: &[String]) -> (usize, usize) {
        let confirmed = ids
            .iter()
            .filter(|id| service.order(id).unwrap().status == OrderStatus::Confirmed)
            .count();
        (confirmed, ids.len() - confirmed)
    }

    fn create_many(service: &OrderService, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                service
                    .create(1, order(&[("A-1", 1)], "a@example.com"))
                    .unwrap()
                    .id
            })
            .collect()
    }

    #[tokio::test]
    async fn a_large_order_or_a_full_queue_is_refused() {
        // backend53 M1: an order of 104,000 items was taken, and every
        // later list carried it; a flood queued without bound.
        let service = seeded_service();
        let many: Vec<(&str, u32)> = vec![("A-1", 1); MAX_ITEMS + 1];
        assert_eq!(
            service.create(1, order(&many, "a@example.com")),
            Err(ServiceError::Invalid("an order holds at most 100 items"))
        );
        assert!(service
            .create(1, order(&many[..MAX_ITEMS], "a@example.com"))
            .is_ok());
        // Created with no await between them, none confirmed yet.
        create_many(&service, MAX_PENDING - 1);
        assert_eq!(
            service.create(1, order(&[("A-1", 1)], "a@example.com")),
            Err(ServiceError::Busy)
        );
    }

    #[tokio::test]
    async fn an_order_for_an_unknown_user_is_refused_and_not_published() {
        let service = seeded_service();
        for user in [0, 4, 999_999] {
            let refused = service.create(user, order(&[("A-1", 1)], "a@example.com"));
            assert_eq!(refused, Err(ServiceError::UnknownUser), "user {user}");
            assert_eq!(service.orders_of(user), Err(ServiceError::UnknownUser));
        }
        assert_eq!(service.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_confirms_every_queued_order_before_the_deadline() {
        let service = seeded_service();
        let ids = create_many(&service, 30);
        let left = service.drain(Instant::now() + Duration::from_secs(5)).await;
        assert_eq!(left, 0);
        assert_eq!(statuses(&service, &ids), (30, 0));
        // A second drain has nothing left to do.
        assert_eq!(service.drain(Instant::now()).await, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_stops_the_worker_at_the_deadline_and_counts_what_is_left() {
        let service = seeded_service();
        let ids = create_many(&service, CONFIRMING * 4);
        // Each confirmation takes two slow steps: two rounds fit.
        let left = service.drain(Instant::now() + SLOW_STEP * 5).await;
        let (confirmed, unconfirmed) = statuses(&service, &ids);
        assert!(
            confirmed > 0 && left > 0,
            "{confirmed} confirmed, {left} left"
        );
        assert_eq!(left, unconfirmed);
        // The worker is gone: nothing changes later, and new orders stay
        // pending instead of being queued for nobody.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(statuses(&service, &ids), (confirmed, unconfirmed));
        create_many(&service, 1);
        assert_eq!(service.pending(), left);
    }

    #[tokio::test(start_paused = true)]
    async fn the_worker_confirms_orders_side_by_side() {
        let service = seeded_service();
        let ids = create_many(&service, CONFIRMING);
        // One confirmation's time (two slow steps) and a little over.
        tokio::time::sleep(SLOW_STEP * 3).await;
        assert_eq!(statuses(&service, &ids), (CONFIRMING, 0));
        assert_eq!(service.pending(), 0);
    }

    #[tokio::test]
    async fn the_worker_confirms_a_created_order() {
        let repo: Arc<dyn OrderRepository> =
            Arc::new(super::super::repository::InMemoryRepository::seeded());
        let service = OrderService::start(repo);
        let created = service
            .create(1, order(&[("A-1", 1)], "a@example.com"))
            .unwrap();
        assert_eq!(created.status, OrderStatus::Pending);
        let confirmed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if service.order(&created.id).unwrap().status == OrderStatus::Confirmed {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(confirmed.is_ok(), "order never confirmed");
    }
}
