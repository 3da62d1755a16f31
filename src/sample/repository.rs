//! Storage behind the order service: a trait, so the service does not care
//! where orders live, and the in-memory store the sample uses. The store is
//! the one place that knows which users exist (the seeded users 1 to 3);
//! orders are only taken for them. Each user has a version that changes with
//! their orders; it becomes the list's ETag, and starts at a random point
//! per store.

use std::collections::HashMap;
use std::sync::RwLock;

use super::model::{NewOrder, Order, OrderItem, OrderStatus};

pub trait OrderRepository: Send + Sync + std::fmt::Debug {
    /// A user's orders and their version, `None` for an unknown user.
    fn orders_of(&self, user_id: u64) -> Option<(Vec<Order>, u64)>;
    fn order(&self, order_id: &str) -> Option<Order>;
    /// Stores a new pending order; `None` (and nothing stored) for an
    /// unknown user, so reads and writes agree on who exists.
    fn insert(&self, user_id: u64, order: NewOrder) -> Option<Order>;
    /// Returns false for an unknown order.
    fn set_status(&self, order_id: &str, status: OrderStatus) -> bool;
}

/// The most orders a user keeps: a new one past it drops the oldest (a
/// 404 from then on), so that neither the store nor a user's list, sent
/// whole, grows without bound (backend53 M1: a flood of orders made lists
/// of tens of megabytes, and the demo's proxy, on the same runtime,
/// stalled while they were written).
pub const MAX_ORDERS_PER_USER: usize = 1000;

#[derive(Debug, Default)]
struct State {
    /// user id -> (order ids in creation order, version)
    users: HashMap<u64, (Vec<String>, u64)>,
    orders: HashMap<String, Order>,
    next_id: u64,
}

#[derive(Debug)]
pub struct InMemoryRepository {
    state: RwLock<State>,
    /// What new orders' ids start with: `ORDER-`, or `ORDER-b1-` for the
    /// store of one instance among several (see
    /// [`InMemoryRepository::seeded_for`]).
    prefix: String,
}

impl InMemoryRepository {
    /// [`InMemoryRepository::seeded`], for one instance among several that
    /// each keep a store of their own (`order-backend` processes): new
    /// orders' ids carry the instance's `name` (`ORDER-b1-002`), so the
    /// `Location` of an order made on one instance is a 404 on another,
    /// not an order another instance made under the same id, which a
    /// round-robin GET showed another customer (review35c 1). A name with
    /// characters a path would need escaped is replaced by a hash of it.
    pub fn seeded_for(name: &str) -> Self {
        let plain = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        let tag = if plain {
            name.to_owned()
        } else {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            name.hash(&mut hasher);
            format!("{:08x}", hasher.finish() as u32)
        };
        InMemoryRepository {
            prefix: format!("ORDER-{tag}-"),
            ..Self::seeded()
        }
    }

    /// Users 1 to 3 exist; user 1 has the confirmed order `ORDER-001`.
    pub fn seeded() -> Self {
        let mut state = State {
            next_id: 2,
            ..State::default()
        };
        let seed = Order {
            id: "ORDER-001".into(),
            user_id: 1,
            items: vec![OrderItem {
                sku: "A-1".into(),
                qty: 1,
            }],
            amount_cents: 999,
            email: "alice@example.com".into(),
            status: OrderStatus::Confirmed,
        };
        // Versions start at a random point, so that two stores (two
        // order-backend processes) do not give one ETag to lists that
        // differ, which a cache revalidating against the other would
        // take as unchanged.
        let first = fastrand::u64(1..1 << 40);
        state.users.insert(1, (vec![seed.id.clone()], first));
        state.users.insert(2, (Vec::new(), first));
        state.users.insert(3, (Vec::new(), first));
        state.orders.insert(seed.id.clone(), seed);
        InMemoryRepository {
            state: RwLock::new(state),
            prefix: "ORDER-".into(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-written:
        // every mutation below is a single insert or field store.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl OrderRepository for InMemoryRepository {
    fn orders_of(&self, user_id: u64) -> Option<(Vec<Order>, u64)> {
        let state = self.read();
        let (ids, version) = state.users.get(&user_id)?;
        let orders = ids
            .iter()
            .filter_map(|id| state.orders.get(id).cloned())
            .collect();
        Some((orders, *version))
    }

    fn order(&self, order_id: &str) -> Option<Order> {
        self.read().orders.get(order_id).cloned()
    }

    fn insert(&self, user_id: u64, new: NewOrder) -> Option<Order> {
        let mut guard = self.write();
        let state = &mut *guard;
        // Looked up under the same lock as the insert: a refused order uses
        // up no id and creates no user.
        let user = state.users.get_mut(&user_id)?;
        let id = format!("{}{:03}", self.prefix, state.next_id);
        state.next_id += 1;
        let order = Order {
            id: id.clone(),
            user_id,
            items: new.items,
            amount_cents: new.amount_cents,
            email: new.email,
            status: OrderStatus::Pending,
        };
        user.0.push(id.clone());
        user.1 += 1;
        if user.0.len() > MAX_ORDERS_PER_USER {
            let oldest = user.0.remove(0);
            state.orders.remove(&oldest);
        }
        state.orders.insert(id, order.clone());
        Some(order)
    }

    fn set_status(&self, order_id: &str, status: OrderStatus) -> bool {
        let mut state = self.write();
        let Some(order) = state.orders.get_mut(order_id) else {
            return false;
        };
        order.status = status;
        let user_id = order.user_id;
        if let Some(user) = state.users.get_mut(&user_id) {
            user.1 += 1;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_order() -> NewOrder {
        NewOrder {
            items: vec![OrderItem {
                sku: "B-2".into(),
                qty: 2,
            }],
            amount_cents: 100,
            email: "b@example.com".into(),
        }
    }

    #[test]
    fn seeded_user_one_has_order_001() {
        let repo = InMemoryRepository::seeded();
        let (orders, _) = repo.orders_of(1).unwrap();
        assert_eq!(orders[0].id, "ORDER-001");
        assert!(repo.orders_of(99).is_none());
    }

    #[test]
    fn inserting_and_confirming_bump_the_user_version() {
        let repo = InMemoryRepository::seeded();
        let (_, v0) = repo.orders_of(1).unwrap();
        let order = repo.insert(1, new_order()).unwrap();
        assert_eq!(order.id, "ORDER-002");
        assert_eq!(order.status, OrderStatus::Pending);
        let (orders, v1) = repo.orders_of(1).unwrap();
        assert_eq!(orders.len(), 2);
        assert!(v1 > v0);
        assert!(repo.set_status(&order.id, OrderStatus::Confirmed));
        assert!(repo.orders_of(1).unwrap().1 > v1);
        assert!(!repo.set_status("ORDER-999", OrderStatus::Confirmed));
    }

    /// A user keeps their latest orders: the oldest goes (backend53 M1:
    /// the store and the list grew without bound).
    #[test]
    fn a_user_keeps_only_their_latest_orders() {
        let repo = InMemoryRepository::seeded();
        let ids: Vec<String> = (0..MAX_ORDERS_PER_USER)
            .map(|_| repo.insert(1, new_order()).unwrap().id)
            .collect();
        let (orders, _) = repo.orders_of(1).unwrap();
        assert_eq!(orders.len(), MAX_ORDERS_PER_USER);
        assert_eq!(orders[0].id, ids[0]);
        assert!(repo.order("ORDER-001").is_none());
        assert!(repo.order(&ids[0]).is_some());
        // Another user's are their own.
        assert_eq!(repo.orders_of(2).unwrap().0.len(), 0);
    }

    #[test]
    fn two_stores_do_not_share_versions() {
        let (a, b) = (InMemoryRepository::seeded(), InMemoryRepository::seeded());
        assert_ne!(a.orders_of(1).unwrap().1, b.orders_of(1).unwrap().1);
    }

    #[test]
    fn orders_are_only_taken_for_known_users() {
        let repo = InMemoryRepository::seeded();
        for unknown in [0, 4, 42, u64::MAX] {
            assert!(
                repo.insert(unknown, new_order()).is_none(),
                "user {unknown}"
            );
            assert!(repo.orders_of(unknown).is_none(), "user {unknown}");
        }
        // The refused orders used up no id.
        assert_eq!(repo.insert(2, new_order()).unwrap().id, "ORDER-002");
        // One instance among several: its ids are its own; the seed stays.
        let named = InMemoryRepository::seeded_for("b1");
        assert_eq!(named.insert(2, new_order()).unwrap().id, "ORDER-b1-002");
        assert!(named.order("ORDER-001").is_some());
        let odd = InMemoryRepository::seeded_for("b/1?");
        let id = odd.insert(2, new_order()).unwrap().id;
        assert!(
            id.starts_with("ORDER-") && id.ends_with("-002") && !id.contains(['/', '?']),
            "{id}"
        );
        assert_eq!(repo.orders_of(2).unwrap().0.len(), 1);
    }
}
