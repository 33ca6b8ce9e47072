//! The routes: status codes, headers and problem bodies (SQLite; the store
//! paths are covered on every backend by the other suites).

mod common;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use flowline_http::Principal;
use serde_json::{json, Value};
use tower::ServiceExt;
use utoipa::OpenApi;

struct App {
    router: axum::Router,
    _env: common::Env,
}

async fn app() -> App {
    let env = common::envs().await.remove(0);
    env.prices.set("a", 1000, "BRL", true);
    App {
        router: flowline_cart::routes(env.carts.clone()),
        _env: env,
    }
}

impl App {
    /// What the server's authentication and edge steps would have attached.
    async fn call(
        &self,
        user: &str,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let mut req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        req.extensions_mut().insert(Principal {
            user_id: user.into(),
            session_id: "s".into(),
            roles: vec![],
        });
        req.extensions_mut().insert(common::ctx());
        let res = self.router.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (parts.status, parts.headers, v)
    }
}

#[tokio::test]
async fn cart_routes_answer_with_views_and_problems() {
    let app = app().await;
    let (s, h, cart) = app.call("u1", Method::POST, "/carts", None).await;
    assert_eq!(s, StatusCode::CREATED);
    let id = cart["id"].as_str().unwrap().to_owned();
    assert_eq!(h[header::LOCATION], format!("/api/v1/carts/{id}").as_str());
    assert_eq!(cart["subtotal"], Value::Null);
    assert_eq!(cart["items"], json!([]));

    let items = format!("/carts/{id}/items");
    let (s, _, v) = app
        .call(
            "u1",
            Method::POST,
            &items,
            Some(json!({"product_id": "a", "quantity": 2})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["subtotal"], json!({"amount": 2000, "currency": "BRL"}));
    assert_eq!(
        v["items"][0]["unit_price"],
        json!({"amount": 1000, "currency": "BRL"})
    );
    assert_eq!(v["items"][0]["available"], true);

    let (s, h, v) = app
        .call(
            "u1",
            Method::POST,
            &items,
            Some(json!({"product_id": "a", "quantity": 100})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(h[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(v["errors"][0]["field"], "quantity");
    let (s, _, v) = app
        .call(
            "u1",
            Method::POST,
            &items,
            Some(json!({"product_id": "a", "quantity": 1, "price": 1})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown fields refused: {v}"
    );
    let (s, _, v) = app.call("u1", Method::POST, &items, Some(json!({}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        v["errors"].as_array().unwrap().len(),
        2,
        "missing fields named: {v}"
    );

    let line = format!("/carts/{id}/items/a");
    let (s, _, v) = app
        .call("u1", Method::PATCH, &line, Some(json!({"quantity": 5})))
        .await;
    assert_eq!((s, v["item_count"].as_i64()), (StatusCode::OK, Some(5)));
    let (s, _, _) = app
        .call("u2", Method::GET, &format!("/carts/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another user's cart");
    let (s, _, v) = app.call("u1", Method::DELETE, &line, None).await;
    assert_eq!((s, v["currency"].clone()), (StatusCode::OK, Value::Null));
}

#[tokio::test]
async fn address_routes_keep_list_and_delete() {
    let app = app().await;
    let path = "/users/me/addresses";
    let new = json!({"name": "Ana", "line1": "Rua A, 1", "city": "Recife", "postal_code": "50000-000", "country": "BR"});
    let (s, _, a) = app.call("u1", Method::POST, path, Some(new.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    assert_eq!(a["line2"], Value::Null);
    let (s, _, v) = app
        .call("u1", Method::POST, path, Some(json!({"name": "Ana"})))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let named: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(named, ["line1", "city", "postal_code", "country"]);

    let (s, _, list) = app.call("u1", Method::GET, path, None).await;
    assert_eq!(
        (s, list["items"].as_array().unwrap().len()),
        (StatusCode::OK, 1)
    );
    let one = format!("{path}/{}", a["id"].as_str().unwrap());
    assert_eq!(
        app.call("u2", Method::DELETE, &one, None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.call("u1", Method::DELETE, &one, None).await.0,
        StatusCode::NO_CONTENT
    );
}

#[test]
fn every_route_is_documented_under_the_cart_tag() {
    let doc = serde_json::to_value(flowline_cart::CartApi::openapi()).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/v1/carts",
        "/api/v1/carts/{id}",
        "/api/v1/carts/{id}/items",
        "/api/v1/carts/{id}/items/{product_id}",
        "/api/v1/users/me/addresses",
        "/api/v1/users/me/addresses/{id}",
    ] {
        let ops = paths[p]
            .as_object()
            .unwrap_or_else(|| panic!("{p} missing"));
        for (method, op) in ops {
            assert_eq!(op["tags"], json!(["cart"]), "{method} {p}");
            assert!(op["security"].is_array(), "{method} {p}");
        }
    }
}
