//! Templates: `{{name}}`-style variables, locale fallback, and the defaults
//! seeded at open.
//!
//! Rendering is deliberately small: a variable is replaced by its value (HTML
//! escaped in HTML bodies), and a variable the delivery does not carry is an
//! error, never an empty string, so a broken template fails loudly instead of
//! mailing "Hello ," to every customer.

use crate::Channel::{Email, InApp, Push};
use std::collections::BTreeMap;

/// Values a template is rendered with.
pub type Vars = BTreeMap<String, String>;

/// Why a template did not render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// `{{name}}` with no value for `name`.
    Missing(String),
    /// An unclosed `{{` or a name that is not `[a-z0-9_]+`.
    Syntax(String),
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RenderError::Missing(v) => write!(f, "no value for variable `{{{{{v}}}}}`"),
            RenderError::Syntax(s) => write!(f, "template syntax: {s}"),
        }
    }
}

impl std::error::Error for RenderError {}

/// Renders `src`, escaping values for HTML when `html` is set.
pub fn render(src: &str, vars: &Vars, html: bool) -> Result<String, RenderError> {
    let mut out = String::with_capacity(src.len() + 64);
    let mut rest = src;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(RenderError::Syntax("`{{` is never closed".into()));
        };
        let name = after[..end].trim();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(RenderError::Syntax(format!(
                "`{{{{{name}}}}}` is not a variable name (a-z, 0-9, _)"
            )));
        }
        let value = vars
            .get(name)
            .ok_or_else(|| RenderError::Missing(name.to_owned()))?;
        if html {
            escape_html(value, &mut out);
        } else {
            out.push_str(value);
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn escape_html(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// A subject is one header line: control characters a value might carry
/// (a display name with a newline) become spaces.
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// `pt-br` → `pt-BR`, `EN` → `en`; `None` unless `ll`, `lll`, `ll-RR` or `lll-RR`.
pub fn normalize_locale(s: &str) -> Option<String> {
    let (lang, region) = match s.split_once(['-', '_']) {
        Some((l, r)) => (l, Some(r)),
        None => (s, None),
    };
    if !(2..=3).contains(&lang.len()) || !lang.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let mut out = lang.to_ascii_lowercase();
    if let Some(r) = region {
        if r.len() != 2 || !r.bytes().all(|b| b.is_ascii_alphabetic()) {
            return None;
        }
        out.push('-');
        out.push_str(&r.to_ascii_uppercase());
    }
    Some(out)
}

/// Locales to try, best first: exact (`pt-BR`), language (`pt`), then `en`.
pub fn fallback_chain(locale: &str) -> Vec<String> {
    let mut chain = vec![locale.to_owned()];
    if let Some((lang, _)) = locale.split_once('-') {
        chain.push(lang.to_owned());
    }
    if !chain.iter().any(|l| l == DEFAULT_LOCALE) {
        chain.push(DEFAULT_LOCALE.to_owned());
    }
    chain
}

pub const DEFAULT_LOCALE: &str = "en";

/// A notification type: its template key, the variables its events supply,
/// and the channels it goes out on.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub key: &'static str,
    pub variables: &'static [&'static str],
    pub channels: &'static [crate::Channel],
}

const SHIPMENT_VARS: &[&str] = &[
    "name",
    "order_number",
    "order_id",
    "shipment_id",
    "tracking_number",
    "status",
    "at",
];

/// Every notification type flowline knows.
pub const KINDS: &[Kind] = &[
    Kind {
        key: "welcome",
        variables: &["name", "email"],
        channels: &[Email],
    },
    Kind {
        key: "order_confirmed",
        variables: &[
            "name",
            "order_number",
            "order_id",
            "total",
            "items",
            "item_count",
        ],
        channels: &[Email, InApp, Push],
    },
    Kind {
        key: "order_cancelled",
        variables: &["name", "order_number", "order_id", "reason"],
        channels: &[Email, InApp],
    },
    Kind {
        key: "shipment_picked",
        variables: SHIPMENT_VARS,
        channels: &[Email, InApp],
    },
    Kind {
        key: "shipment_in_transit",
        variables: SHIPMENT_VARS,
        channels: &[Email, InApp],
    },
    Kind {
        key: "shipment_delivered",
        variables: SHIPMENT_VARS,
        channels: &[Email, InApp, Push],
    },
    Kind {
        key: "message_mention",
        variables: &["name", "sender", "conversation_id", "excerpt"],
        channels: &[InApp, Push],
    },
    Kind {
        key: "message_direct",
        variables: &["name", "sender", "conversation_id", "excerpt"],
        channels: &[InApp, Push],
    },
    Kind {
        key: "workspace_welcome",
        variables: &["name", "workspace_name", "workspace_id"],
        channels: &[InApp],
    },
];

pub fn kind(key: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.key == key)
}

/// Sample values for every variable of `kind`: what a new template version
/// must render with to be accepted.
pub fn sample_vars(kind: &Kind) -> Vars {
    kind.variables
        .iter()
        .map(|v| ((*v).to_owned(), format!("<{v}>")))
        .collect()
}

/// Checks a template against its kind's variables; returns the offending
/// field and why.
pub fn check(
    kind: &Kind,
    subject: &str,
    text: &str,
    html: Option<&str>,
) -> Vec<(&'static str, String)> {
    let vars = sample_vars(kind);
    let mut errors = Vec::new();
    let parts = [
        ("subject", Some(subject)),
        ("text", Some(text)),
        ("html", html),
    ];
    for (field, src) in parts {
        let Some(src) = src else { continue };
        if let Err(e) = render(src, &vars, field == "html") {
            let msg = match e {
                RenderError::Missing(v) => format!(
                    "`{{{{{v}}}}}` is not a variable of `{}` (known: {})",
                    kind.key,
                    kind.variables.join(", ")
                ),
                other => other.to_string(),
            };
            errors.push((field, msg));
        }
    }
    errors
}

/// A default template: (key, locale, subject, text, html).
type DefaultTemplate = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

/// Seeded as version 1 of each (key, locale) that has no version yet.
pub const DEFAULTS: &[DefaultTemplate] = &[
    (
        "welcome",
        "en",
        "Welcome to flowline, {{name}}",
        "Hi {{name}},\n\nyour flowline account ({{email}}) is ready.\n\nHappy shopping!\n",
        "<p>Hi {{name}},</p><p>your flowline account (<b>{{email}}</b>) is ready.</p><p>Happy shopping!</p>",
    ),
    (
        "welcome",
        "pt-BR",
        "Boas-vindas ao flowline, {{name}}",
        "Olá {{name}},\n\nsua conta flowline ({{email}}) está pronta.\n\nBoas compras!\n",
        "<p>Olá {{name}},</p><p>sua conta flowline (<b>{{email}}</b>) está pronta.</p><p>Boas compras!</p>",
    ),
    (
        "order_confirmed",
        "en",
        "Order {{order_number}} confirmed",
        "Hi {{name}},\n\nyour order {{order_number}} is confirmed.\n\n{{items}}\n\nTotal: {{total}}\n",
        "<p>Hi {{name}},</p><p>your order <b>{{order_number}}</b> is confirmed.</p><pre>{{items}}</pre><p>Total: <b>{{total}}</b></p>",
    ),
    (
        "order_confirmed",
        "pt-BR",
        "Pedido {{order_number}} confirmado",
        "Olá {{name}},\n\nseu pedido {{order_number}} foi confirmado.\n\n{{items}}\n\nTotal: {{total}}\n",
        "<p>Olá {{name}},</p><p>seu pedido <b>{{order_number}}</b> foi confirmado.</p><pre>{{items}}</pre><p>Total: <b>{{total}}</b></p>",
    ),
    (
        "order_cancelled",
        "en",
        "Order {{order_number}} cancelled",
        "Hi {{name}},\n\nyour order {{order_number}} was cancelled. {{reason}}\n",
        "<p>Hi {{name}},</p><p>your order <b>{{order_number}}</b> was cancelled. {{reason}}</p>",
    ),
    (
        "order_cancelled",
        "pt-BR",
        "Pedido {{order_number}} cancelado",
        "Olá {{name}},\n\nseu pedido {{order_number}} foi cancelado. {{reason}}\n",
        "<p>Olá {{name}},</p><p>seu pedido <b>{{order_number}}</b> foi cancelado. {{reason}}</p>",
    ),
    (
        "shipment_picked",
        "en",
        "Order {{order_number}} is being prepared",
        "Hi {{name}},\n\nyour order {{order_number}} was picked and is being packed.\n",
        "<p>Hi {{name}},</p><p>your order <b>{{order_number}}</b> was picked and is being packed.</p>",
    ),
    (
        "shipment_picked",
        "pt-BR",
        "Pedido {{order_number}} em preparação",
        "Olá {{name}},\n\nseu pedido {{order_number}} foi separado e está sendo embalado.\n",
        "<p>Olá {{name}},</p><p>seu pedido <b>{{order_number}}</b> foi separado e está sendo embalado.</p>",
    ),
    (
        "shipment_in_transit",
        "en",
        "Order {{order_number}} is on its way",
        "Hi {{name}},\n\nyour order {{order_number}} is on its way. Tracking number: {{tracking_number}}.\n",
        "<p>Hi {{name}},</p><p>your order <b>{{order_number}}</b> is on its way.</p><p>Tracking number: <code>{{tracking_number}}</code></p>",
    ),
    (
        "shipment_in_transit",
        "pt-BR",
        "Pedido {{order_number}} a caminho",
        "Olá {{name}},\n\nseu pedido {{order_number}} está a caminho. Código de rastreio: {{tracking_number}}.\n",
        "<p>Olá {{name}},</p><p>seu pedido <b>{{order_number}}</b> está a caminho.</p><p>Código de rastreio: <code>{{tracking_number}}</code></p>",
    ),
    (
        "shipment_delivered",
        "en",
        "Order {{order_number}} delivered",
        "Hi {{name}},\n\nyour order {{order_number}} was delivered. Enjoy!\n",
        "<p>Hi {{name}},</p><p>your order <b>{{order_number}}</b> was delivered. Enjoy!</p>",
    ),
    (
        "shipment_delivered",
        "pt-BR",
        "Pedido {{order_number}} entregue",
        "Olá {{name}},\n\nseu pedido {{order_number}} foi entregue. Aproveite!\n",
        "<p>Olá {{name}},</p><p>seu pedido <b>{{order_number}}</b> foi entregue. Aproveite!</p>",
    ),
    (
        "message_mention",
        "en",
        "{{sender}} mentioned you",
        "Hi {{name}},\n\n{{sender}} mentioned you: \"{{excerpt}}\"\n",
        "<p>Hi {{name}},</p><p>{{sender}} mentioned you:</p><blockquote>{{excerpt}}</blockquote>",
    ),
    (
        "message_mention",
        "pt-BR",
        "{{sender}} mencionou você",
        "Olá {{name}},\n\n{{sender}} mencionou você: \"{{excerpt}}\"\n",
        "<p>Olá {{name}},</p><p>{{sender}} mencionou você:</p><blockquote>{{excerpt}}</blockquote>",
    ),
    (
        "message_direct",
        "en",
        "New message from {{sender}}",
        "Hi {{name}},\n\n{{sender}} wrote to you: \"{{excerpt}}\"\n",
        "<p>Hi {{name}},</p><p>{{sender}} wrote to you:</p><blockquote>{{excerpt}}</blockquote>",
    ),
    (
        "message_direct",
        "pt-BR",
        "Nova mensagem de {{sender}}",
        "Olá {{name}},\n\n{{sender}} escreveu para você: \"{{excerpt}}\"\n",
        "<p>Olá {{name}},</p><p>{{sender}} escreveu para você:</p><blockquote>{{excerpt}}</blockquote>",
    ),
    (
        "workspace_welcome",
        "en",
        "Welcome to {{workspace_name}}",
        "Hi {{name}},\n\nyour workspace {{workspace_name}} is ready; #general is waiting for you.\n",
        "<p>Hi {{name}},</p><p>your workspace <b>{{workspace_name}}</b> is ready; #general is waiting for you.</p>",
    ),
    (
        "workspace_welcome",
        "pt-BR",
        "Boas-vindas a {{workspace_name}}",
        "Olá {{name}},\n\nseu espaço de trabalho {{workspace_name}} está pronto; o #general espera por você.\n",
        "<p>Olá {{name}},</p><p>seu espaço de trabalho <b>{{workspace_name}}</b> está pronto; o #general espera por você.</p>",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn renders_escapes_html_and_refuses_missing_variables() {
        let v = vars(&[("name", "Ana <b>&"), ("n", "7")]);
        assert_eq!(
            render("Hi {{name}}, {{ n }}!", &v, false).unwrap(),
            "Hi Ana <b>&, 7!"
        );
        assert_eq!(
            render("<p>{{name}}</p>", &v, true).unwrap(),
            "<p>Ana &lt;b&gt;&amp;</p>"
        );
        assert_eq!(
            render("{{missing}}", &v, false),
            Err(RenderError::Missing("missing".into()))
        );
        assert!(matches!(
            render("{{name", &v, false),
            Err(RenderError::Syntax(_))
        ));
        assert!(matches!(
            render("{{Na-me}}", &v, false),
            Err(RenderError::Syntax(_))
        ));
        assert_eq!(render("no vars", &v, true).unwrap(), "no vars");
    }

    #[test]
    fn locales_normalize_and_fall_back_to_language_then_english() {
        assert_eq!(normalize_locale("pt_br").as_deref(), Some("pt-BR"));
        assert_eq!(normalize_locale("EN").as_deref(), Some("en"));
        assert_eq!(normalize_locale("english"), None);
        assert_eq!(normalize_locale("pt-BRA"), None);
        assert_eq!(fallback_chain("pt-BR"), ["pt-BR", "pt", "en"]);
        assert_eq!(fallback_chain("fr"), ["fr", "en"]);
        assert_eq!(fallback_chain("en-GB"), ["en-GB", "en"]);
        assert_eq!(fallback_chain("en"), ["en"]);
    }

    #[test]
    fn every_default_renders_with_its_kinds_variables() {
        for (key, locale, subject, text, html) in DEFAULTS {
            let k = kind(key).unwrap_or_else(|| panic!("{key} has no kind"));
            assert!(
                check(k, subject, text, Some(html)).is_empty(),
                "{key}/{locale}"
            );
        }
        for k in KINDS {
            for locale in ["en", "pt-BR"] {
                assert!(
                    DEFAULTS.iter().any(|d| d.0 == k.key && d.1 == locale),
                    "{} has no {locale} default",
                    k.key
                );
            }
        }
        let errs = check(kind("welcome").unwrap(), "{{order_number}}", "ok", None);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, "subject");
    }
}
