//! Shipping addresses on every backend.

mod common;

use common::{envs, fields};
use flowline_cart::{NewAddress, MAX_ADDRESSES};

fn home() -> NewAddress {
    NewAddress {
        name: "  Ana Souza ".into(),
        line1: "Rua das Flores, 100".into(),
        line2: Some("  ".into()),
        city: "São Paulo".into(),
        region: Some("SP".into()),
        postal_code: "01310-100".into(),
        country: "BR".into(),
        latitude: Some(-23.561),
        longitude: Some(-46.656),
    }
}

#[tokio::test]
async fn addresses_are_validated_kept_listed_and_deleted() {
    for env in envs().await {
        let (c, n) = (&env.carts, env.name);
        let bad = NewAddress {
            name: String::new(),
            line1: "x".repeat(201),
            line2: Some("y".repeat(201)),
            city: " ".into(),
            region: Some("r".repeat(101)),
            postal_code: "01310_100".into(),
            country: "br".into(),
            latitude: Some(91.0),
            longitude: Some(-181.0),
        };
        let e = c.add_address("u1", bad).await.unwrap_err();
        assert_eq!(e.0.code, "validation_failed", "{n}");
        assert_eq!(
            fields(&e),
            [
                "name",
                "line1",
                "line2",
                "city",
                "region",
                "postal_code",
                "country",
                "latitude",
                "longitude"
            ],
            "{n}"
        );
        for country in ["ZZ", "BRA", ""] {
            let e = c
                .add_address(
                    "u1",
                    NewAddress {
                        country: country.into(),
                        ..home()
                    },
                )
                .await
                .unwrap_err();
            assert_eq!(fields(&e), ["country"], "{n} {country}");
        }
        assert!(
            c.addresses("u1").await.unwrap().is_empty(),
            "{n}: nothing stored"
        );

        let a = c.add_address("u1", home()).await.unwrap();
        assert_eq!(a.name, "Ana Souza", "{n}: trimmed");
        assert_eq!(a.line2, None, "{n}: blank optional dropped");
        assert_eq!(a.region.as_deref(), Some("SP"));
        assert_eq!(c.address("u1", &a.id).await.unwrap(), a, "{n}");
        assert_eq!(c.addresses("u1").await.unwrap(), std::slice::from_ref(&a));

        assert_eq!(
            c.address("u2", &a.id).await.unwrap_err().0.code,
            "not_found"
        );
        assert!(c.addresses("u2").await.unwrap().is_empty());
        assert_eq!(
            c.delete_address("u2", &a.id).await.unwrap_err().0.status,
            404,
            "{n}"
        );
        c.delete_address("u1", &a.id).await.unwrap();
        assert_eq!(
            c.delete_address("u1", &a.id).await.unwrap_err().0.status,
            404
        );
        assert!(c.addresses("u1").await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_user_keeps_at_most_twenty_addresses_even_when_racing() {
    for env in envs().await {
        let (c, n) = (&env.carts, env.name);
        let tries: Vec<_> = (0..MAX_ADDRESSES + 5)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.add_address("u1", home()).await })
            })
            .collect();
        let mut kept = 0;
        for t in tries {
            match t.await.unwrap() {
                Ok(_) => kept += 1,
                Err(e) => assert_eq!(e.0.status, 422, "{n}"),
            }
        }
        assert_eq!(kept, MAX_ADDRESSES, "{n}");
        let all = c.addresses("u1").await.unwrap();
        assert_eq!(all.len() as i64, MAX_ADDRESSES);
        assert!(
            all.windows(2).all(|w| w[0].id < w[1].id),
            "{n}: oldest first"
        );

        // Another user has their own allowance; a deletion frees a slot.
        c.add_address("u2", home()).await.unwrap();
        c.delete_address("u1", &all[0].id).await.unwrap();
        c.add_address("u1", home()).await.unwrap();
        assert_eq!(
            c.add_address("u1", home()).await.unwrap_err().0.status,
            422,
            "{n}"
        );
    }
}
