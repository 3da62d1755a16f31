//! The order backend's data: users own orders, orders move from `pending`
//! to `confirmed` once the worker has done the slow part.

use serde::{Deserialize, Serialize};

/// Unknown fields are refused, as in [`NewOrder`]: a misspelt `qtty` next
/// to `qty` is a 400, not dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderItem {
    pub sku: String,
    pub qty: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Pending,
    Confirmed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: String,
    pub user_id: u64,
    pub items: Vec<OrderItem>,
    pub amount_cents: u64,
    pub email: String,
    pub status: OrderStatus,
}

/// The body of `POST /users/{id}/orders`. Unknown fields are refused so a
/// typo in a client shows up as a 400, not as silently missing data.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    pub items: Vec<OrderItem>,
    pub amount_cents: u64,
    pub email: String,
}

/// The event the service publishes for the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderConfirmed {
    pub order_id: String,
    pub email: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused_in_items_too() {
        let typo = r#"{"items":[{"sku":"A-1","qty":1,"qtty":5}],"amount_cents":1,"email":"a@b.c"}"#;
        let error = serde_json::from_str::<NewOrder>(typo).unwrap_err();
        assert!(
            error.to_string().contains("unknown field `qtty`"),
            "{error}"
        );
    }
}
