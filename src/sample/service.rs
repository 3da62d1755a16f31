//! The order service: business rules between HTTP and storage. Creating an
//! order validates it, stores it as pending and publishes `order.confirmed`
//! on an in-process queue; a worker does the slow part (the confirmation
//! e-mail, the inventory reservation) off the request path and marks the
//! order confirmed, so `POST` answers quickly.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::model::{NewOrder, Order, OrderConfirmed, OrderStatus};
use super::repository::OrderRepository;

/// Time each simulated slow step takes in the worker.
const SLOW_STEP: Duration = Duration::from_millis(25);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Invalid(&'static str),
    #[error("user not found")]
    UnknownUser,
    #[error("order not found")]
    UnknownOrder,
}

#[derive(Debug, Clone)]
pub struct OrderService {
    repo: Arc<dyn OrderRepository>,
    queue: mpsc::UnboundedSender<OrderConfirmed>,
}

/// The rules a new order must meet.
pub fn validate(order: &NewOrder) -> Result<(), ServiceError> {
    if order.items.is_empty() {
        return Err(ServiceError::Invalid("items must not be empty"));
    }
    if order.items.iter().any(|item| item.sku.trim().is_empty()) {
        return Err(ServiceError::Invalid("every item needs a sku"));
    }
    if order.items.iter().any(|item| item.qty == 0) {
        return Err(ServiceError::Invalid("qty must be at least 1"));
    }
    let email = order.email.trim();
    if email.len() < 3 || !email.contains('@') || email.starts_with('@') || email.ends_with('@') {
        return Err(ServiceError::Invalid("email must be an address"));
    }
    Ok(())
}

impl OrderService {
    /// Starts the service and its worker on the current runtime. The worker
    /// ends when the last service clone is dropped (the queue closes).
    pub fn start(repo: Arc<dyn OrderRepository>) -> Self {
        let (queue, events) = mpsc::unbounded_channel();
        tokio::spawn(worker(repo.clone(), events));
        OrderService { repo, queue }
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
        let order = self.repo.insert(user_id, new);
        let event = OrderConfirmed {
            order_id: order.id.clone(),
            email: order.email.clone(),
        };
        if self.queue.send(event).is_err() {
            // Only when the runtime is shutting down; the order stays pending.
            tracing::warn!(order = %order.id, "order.confirmed queue closed");
        }
        Ok(order)
    }
}

async fn worker(
    repo: Arc<dyn OrderRepository>,
    mut events: mpsc::UnboundedReceiver<OrderConfirmed>,
) {
    while let Some(event) = events.recv().await {
        // The slow part: e-mail the customer, reserve the stock.
        tokio::time::sleep(SLOW_STEP).await;
        tracing::debug!(order = %event.order_id, to = %event.email, "confirmation e-mail sent");
        tokio::time::sleep(SLOW_STEP).await;
        tracing::debug!(order = %event.order_id, "inventory reserved");
        repo.set_status(&event.order_id, OrderStatus::Confirmed);
    }
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
            (
                order(&[("A-1", 1)], "nobody"),
                Err("email must be an address"),
            ),
            (
                order(&[("A-1", 1)], "@example.com"),
                Err("email must be an address"),
            ),
        ];
        for (input, want) in cases {
            let got = validate(input).map_err(|e| match e {
                ServiceError::Invalid(m) => m,
                other => panic!("{other:?}"),
            });
            assert_eq!(got, *want, "{input:?}");
        }
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
