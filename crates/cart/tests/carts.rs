//! Carts on every backend: prices read at view time, quantities, currency,
//! ownership and checkout.

mod common;

use common::{ctx, envs, events, fields};
use flowline_cart::{AddItem, CartView};

fn add(product_id: &str, quantity: i64) -> AddItem {
    AddItem {
        product_id: product_id.into(),
        quantity,
    }
}

fn line<'a>(v: &'a CartView, product_id: &str) -> &'a flowline_cart::CartLine {
    v.items.iter().find(|l| l.product_id == product_id).unwrap()
}

#[tokio::test]
async fn items_are_added_updated_removed_and_priced_when_read() {
    for env in envs().await {
        let (c, n) = (&env.carts, env.name);
        env.prices.set("a", 1000, "BRL", true);
        env.prices.set("b", 250, "BRL", true);
        let cart = c.create(&ctx(), "u1").await.unwrap();
        assert_eq!(cart.status, "open", "{n}");
        assert_eq!((cart.currency.as_deref(), cart.subtotal), (None, None));
        assert!(cart.items.is_empty());

        let v = c
            .add_item(&ctx(), "u1", &cart.id, add("a", 2))
            .await
            .unwrap();
        assert_eq!(v.currency.as_deref(), Some("BRL"), "{n}");
        let v = c
            .add_item(&ctx(), "u1", &cart.id, add("a", 3))
            .await
            .unwrap();
        assert_eq!(line(&v, "a").quantity, 5, "{n}: adding again adds up");
        let v = c
            .add_item(&ctx(), "u1", &cart.id, add("b", 1))
            .await
            .unwrap();
        assert_eq!(v.items.len(), 2);
        assert_eq!(v.items[0].product_id, "a", "{n}: in the order added");
        assert_eq!(v.item_count, 6);
        assert_eq!(v.subtotal.unwrap().amount, 5250, "{n}");
        assert_eq!(line(&v, "a").line_total.unwrap().amount, 5000);
        assert_eq!(line(&v, "a").title.as_deref(), Some("Product a"));

        // The cart stores no price: a catalog change shows on the next read.
        env.prices.set("a", 1200, "BRL", true);
        let v = c.view("u1", &cart.id).await.unwrap();
        assert_eq!(line(&v, "a").unit_price.unwrap().amount, 1200, "{n}");
        assert_eq!(v.subtotal.unwrap().amount, 6250, "{n}");

        let v = c
            .set_quantity(&ctx(), "u1", &cart.id, "a", 1)
            .await
            .unwrap();
        assert_eq!(line(&v, "a").quantity, 1);
        assert_eq!(v.subtotal.unwrap().amount, 1450, "{n}");
        let e = c
            .set_quantity(&ctx(), "u1", &cart.id, "zz", 1)
            .await
            .unwrap_err();
        assert_eq!(e.0.code, "not_found", "{n}: no such line");

        let v = c.remove_item(&ctx(), "u1", &cart.id, "b").await.unwrap();
        assert_eq!(v.items.len(), 1);
        assert_eq!(v.currency.as_deref(), Some("BRL"));
        let v = c.remove_item(&ctx(), "u1", &cart.id, "a").await.unwrap();
        assert!(v.items.is_empty());
        assert_eq!(
            (v.currency, v.subtotal),
            (None, None),
            "{n}: last item clears currency"
        );
        let e = c
            .remove_item(&ctx(), "u1", &cart.id, "a")
            .await
            .unwrap_err();
        assert_eq!(e.0.code, "not_found");

        // An emptied cart takes whatever currency comes next.
        env.prices.set("usd", 99, "USD", true);
        let v = c
            .add_item(&ctx(), "u1", &cart.id, add("usd", 1))
            .await
            .unwrap();
        assert_eq!(v.currency.as_deref(), Some("USD"), "{n}");

        let evs = events(&c.db).await;
        let types: Vec<&str> = evs.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            types,
            [
                "cart.created",
                "cart.item_added",
                "cart.item_added",
                "cart.item_added",
                "cart.item_updated",
                "cart.item_removed",
                "cart.item_removed",
                "cart.item_added"
            ],
            "{n}"
        );
        assert!(evs.iter().all(|e| e.1 == cart.id && e.2["user_id"] == "u1"));
        assert_eq!(evs[2].2["product_id"], "a");
        assert_eq!(evs[2].2["quantity"], 5, "{n}: the line's new total");
        assert_eq!(evs[4].2["quantity"], 1);
    }
}

#[tokio::test]
async fn products_gone_or_out_of_stock_are_unavailable() {
    for env in envs().await {
        let (c, n) = (&env.carts, env.name);
        env.prices.set("a", 1000, "BRL", true);
        env.prices.set("b", 300, "BRL", true);
        env.prices.set("c", 50, "BRL", true);
        let cart = c.create(&ctx(), "u1").await.unwrap();
        for p in ["a", "b", "c"] {
            c.add_item(&ctx(), "u1", &cart.id, add(p, 2)).await.unwrap();
        }
        env.prices.remove("a");
        env.prices.set("b", 300, "BRL", false);
        let v = c.view("u1", &cart.id).await.unwrap();
        let a = line(&v, "a");
        assert!(
            !a.available && a.title.is_none() && a.unit_price.is_none(),
            "{n}"
        );
        assert!(!line(&v, "b").available, "{n}");
        assert!(line(&v, "c").available);
        assert_eq!(v.items.len(), 3, "{n}: nothing dropped");
        assert_eq!(v.item_count, 6);
        assert_eq!(
            v.subtotal.unwrap().amount,
            700,
            "{n}: the gone product is left out"
        );

        // Re-priced in another currency: shown, but not summed or available.
        env.prices.set("c", 10, "USD", true);
        let v = c.view("u1", &cart.id).await.unwrap();
        assert!(!line(&v, "c").available);
        assert_eq!(v.subtotal.unwrap().amount, 600, "{n}");

        // Totals that do not fit are refused, not wrapped.
        env.prices.set("c", i64::MAX / 2, "BRL", true);
        env.prices.set("b", i64::MAX / 2, "BRL", true);
        let e = c.view("u1", &cart.id).await.unwrap_err();
        assert_eq!(e.0.status, 422, "{n}");
    }
}

#[tokio::test]
async fn another_currency_is_refused_and_nothing_is_stored() {
    for env in envs().await {
        let (c, n) = (&env.carts, env.name);
        env.prices.set("brl", 1000, "BRL", true);
        env.prices.set("usd", 1000, "USD", true);
        let cart = c.create(&ctx(), "u1").await.unwrap();
        c.add_item(&ctx(), "u1", &cart.id, add("brl", 1))
            .await
            .unwrap();
        let before = c.view("u1", &cart.id).await.unwrap();
        let events_before = events(&c.db).await.len();
        let e = c
            .add_item(&ctx(), "u1", &cart.id, add("usd", 1))
            .await
            .unwrap_err();
        assert_eq!(e.0.code, "currency_mismatch", "{n}");
        assert_eq!(e.0.status, 422);
        assert_eq!(c.view("u1", &cart.id).await.unwrap(), before, "{n}");
        assert_eq!(events(&c.db).await.len(), events_before);
    }
}

#[tokio::test]
async fn bad_quantities_and_unknown_products_are_refused_by_name() {
    for env in envs().await {
        let (c, n) = (&env.carts, env.name);
        env.prices.set("a", 1000, "BRL", true);
        let cart = c.create(&ctx(), "u1").await.unwrap();
        for q in [0, -1, 100] {
            let e = c
                .add_item(&ctx(), "u1", &cart.id, add("a", q))
                .await
                .unwrap_err();
            assert_eq!(e.0.code, "validation_failed", "{n} {q}");
            assert_eq!(fields(&e), ["quantity"], "{n} {q}");
        }
        let e = c
            .add_item(&ctx(), "u1", &cart.id, add("", 0))
            .await
            .unwrap_err();
        assert_eq!(
            fields(&e),
            ["product_id", "quantity"],
            "{n}: every bad field"
        );
        let e = c
            .add_item(&ctx(), "u1", &cart.id, add("nope", 1))
            .await
            .unwrap_err();
        assert_eq!(
            (e.0.status, fields(&e)),
            (422, vec!["product_id".to_owned()]),
            "{n}"
        );
        assert!(c.view("u1", &cart.id).await.unwrap().items.is_empty());

        c.add_item(&ctx(), "u1", &cart.id, add("a", 60))
            .await
            .unwrap();
        let e = c
            .add_item(&ctx(), "u1", &cart.id, add("a", 40))
            .await
            .unwrap_err();
        assert_eq!(fields(&e), ["quantity"], "{n}: at most 99 in total");
        let v = c
            .add_item(&ctx(), "u1", &cart.id, add("a", 39))
            .await
            .unwrap();
        assert_eq!(line(&v, "a").quantity, 99);
        for q in [0, -1, 100] {
            let e = c
                .set_quantity(&ctx(), "u1", &cart.id, "a", q)
                .await
                .unwrap_err();
            assert_eq!(fields(&e), ["quantity"], "{n} {q}");
        }
        assert_eq!(
            line(&c.view("u1", &cart.id).await.unwrap(), "a").quantity,
            99
        );
    }
}

#[tokio::test]
async fn another_users_cart_is_not_found() {
    for env in envs().await {
        let (c, n) = (&env.carts, env.name);
        env.prices.set("a", 1000, "BRL", true);
        let cart = c.create(&ctx(), "owner").await.unwrap();
        c.add_item(&ctx(), "owner", &cart.id, add("a", 1))
            .await
            .unwrap();
        let errs = [
            c.view("thief", &cart.id).await.unwrap_err(),
            c.add_item(&ctx(), "thief", &cart.id, add("a", 1))
                .await
                .unwrap_err(),
            c.set_quantity(&ctx(), "thief", &cart.id, "a", 2)
                .await
                .unwrap_err(),
            c.remove_item(&ctx(), "thief", &cart.id, "a")
                .await
                .unwrap_err(),
            c.checkout(&ctx(), "thief", &cart.id, "ref-1")
                .await
                .unwrap_err(),
            c.view("owner", "no-such-cart").await.unwrap_err(),
        ];
        for e in errs {
            assert_eq!((e.0.status, e.0.code), (404, "not_found"), "{n}");
        }
        let v = c.view("owner", &cart.id).await.unwrap();
        assert_eq!(line(&v, "a").quantity, 1, "{n}: untouched");
    }
}

#[tokio::test]
async fn checkout_closes_a_cart_whose_items_are_all_available() {
    for env in envs().await {
        let (c, n) = (&env.carts, env.name);
        env.prices.set("a", 1000, "BRL", true);
        env.prices.set("b", 500, "BRL", true);
        let cart = c.create(&ctx(), "u1").await.unwrap();
        let e = c
            .checkout(&ctx(), "u1", &cart.id, "ref-1")
            .await
            .unwrap_err();
        assert_eq!(
            (e.0.status, fields(&e)),
            (422, vec!["items".to_owned()]),
            "{n}: empty"
        );

        c.add_item(&ctx(), "u1", &cart.id, add("a", 2))
            .await
            .unwrap();
        c.add_item(&ctx(), "u1", &cart.id, add("b", 1))
            .await
            .unwrap();
        env.prices.set("b", 500, "BRL", false);
        let e = c
            .checkout(&ctx(), "u1", &cart.id, "ref-1")
            .await
            .unwrap_err();
        assert_eq!(
            (e.0.status, fields(&e)),
            (409, vec!["items.b".to_owned()]),
            "{n}"
        );
        env.prices.remove("b");
        assert_eq!(
            c.checkout(&ctx(), "u1", &cart.id, "ref-1")
                .await
                .unwrap_err()
                .0
                .status,
            409
        );
        c.remove_item(&ctx(), "u1", &cart.id, "b").await.unwrap();

        let v = c.checkout(&ctx(), "u1", &cart.id, "ref-1").await.unwrap();
        assert_eq!(v.status, "checked_out", "{n}");
        // A retry with the same reference gets the same cart, priced as then,
        // even after the catalog's price changed.
        env.prices.set("a", 9999, "BRL", true);
        let again = c.checkout(&ctx(), "u1", &cart.id, "ref-1").await.unwrap();
        assert_eq!(again, v, "{n}");
        assert_eq!(v.subtotal.unwrap().amount, 2000);
        assert_eq!(c.view("u1", &cart.id).await.unwrap().status, "checked_out");
        let evs = events(&c.db).await;
        let (kind, key, payload) = evs.last().unwrap();
        assert_eq!(
            (kind.as_str(), key.as_str()),
            ("cart.checked_out", cart.id.as_str())
        );
        assert_eq!(payload["items"][0]["product_id"], "a");
        assert_eq!(payload["items"][0]["quantity"], 2);
        assert_eq!(payload["subtotal"]["amount"], 2000, "{n}");

        // Checked out: no more changes, and no second checkout.
        let errs = [
            c.add_item(&ctx(), "u1", &cart.id, add("a", 1))
                .await
                .unwrap_err(),
            c.set_quantity(&ctx(), "u1", &cart.id, "a", 1)
                .await
                .unwrap_err(),
            c.remove_item(&ctx(), "u1", &cart.id, "a")
                .await
                .unwrap_err(),
            c.checkout(&ctx(), "u1", &cart.id, "ref-2")
                .await
                .unwrap_err(),
        ];
        for e in errs {
            assert_eq!((e.0.status, e.0.code), (409, "invalid_state"), "{n}");
        }
        assert_eq!(
            events(&c.db).await.len(),
            evs.len(),
            "{n}: no events for refusals"
        );
    }
}

#[tokio::test]
async fn concurrent_first_items_agree_on_one_currency() {
    for env in envs().await {
        let (c, n) = (&env.carts, env.name);
        env.prices.set("brl", 100, "BRL", true);
        env.prices.set("usd", 100, "USD", true);
        let cart = c.create(&ctx(), "u1").await.unwrap();
        let tries: Vec<_> = ["brl", "usd", "brl", "usd", "brl", "usd"]
            .into_iter()
            .map(|p| {
                let (c, id) = (c.clone(), cart.id.clone());
                tokio::spawn(async move { c.add_item(&ctx(), "u1", &id, add(p, 1)).await })
            })
            .collect();
        for t in tries {
            if let Err(e) = t.await.unwrap() {
                assert_eq!(e.0.code, "currency_mismatch", "{n}");
            }
        }
        let v = c.view("u1", &cart.id).await.unwrap();
        assert_eq!(v.items.len(), 1, "{n}: one currency's product only");
        assert_eq!(v.item_count, 3, "{n}");
        assert!(v.items.iter().all(|l| l.available));
    }
}
