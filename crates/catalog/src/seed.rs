//! A realistic, deterministic catalog for demos and benchmarks: categories with
//! their own attributes and price ranges, brands, plausible titles and
//! descriptions. The same seed always gives the same catalog.

use crate::{Attributes, NewProduct};
use flowline_core::{Currency, Money};

struct Category {
    slug: &'static str,
    nouns: &'static [&'static str],
    /// Price range in minor units.
    price: (i64, i64),
    attributes: &'static [(&'static str, &'static [&'static str])],
}

const COLORS: &[&str] = &[
    "black", "white", "blue", "red", "green", "grey", "navy", "beige", "yellow", "pink",
];
const SIZES: &[&str] = &["xs", "s", "m", "l", "xl", "xxl"];
const SHOE_SIZES: &[&str] = &["36", "37", "38", "39", "40", "41", "42", "43", "44", "45"];

const CATEGORIES: &[Category] = &[
    Category {
        slug: "t-shirts",
        nouns: &["T-Shirt", "Tee", "Polo Shirt", "Tank Top"],
        price: (2990, 12990),
        attributes: &[
            ("color", COLORS),
            ("size", SIZES),
            (
                "material",
                &["cotton", "linen", "polyester", "organic cotton"],
            ),
        ],
    },
    Category {
        slug: "jeans",
        nouns: &["Jeans", "Denim Pants", "Slim Jeans", "Straight Jeans"],
        price: (8990, 34990),
        attributes: &[
            ("color", &["blue", "black", "grey", "white"]),
            ("size", SIZES),
            ("fit", &["slim", "regular", "relaxed", "skinny"]),
        ],
    },
    Category {
        slug: "shoes",
        nouns: &["Sneakers", "Running Shoes", "Boots", "Loafers", "Sandals"],
        price: (12990, 79990),
        attributes: &[
            ("color", COLORS),
            ("size", SHOE_SIZES),
            ("material", &["leather", "canvas", "mesh", "suede"]),
        ],
    },
    Category {
        slug: "jackets",
        nouns: &["Jacket", "Parka", "Windbreaker", "Blazer", "Bomber Jacket"],
        price: (19990, 99990),
        attributes: &[
            ("color", COLORS),
            ("size", SIZES),
            ("material", &["nylon", "wool", "leather", "down"]),
        ],
    },
    Category {
        slug: "headphones",
        nouns: &["Headphones", "Earbuds", "Headset", "Studio Monitors"],
        price: (9990, 249990),
        attributes: &[
            ("color", &["black", "white", "silver", "blue"]),
            ("connectivity", &["bluetooth", "wired", "usb-c"]),
            ("noise_cancelling", &["yes", "no"]),
        ],
    },
    Category {
        slug: "laptops",
        nouns: &["Laptop", "Ultrabook", "Notebook", "2-in-1 Laptop"],
        price: (249990, 1499990),
        attributes: &[
            ("color", &["silver", "space grey", "black"]),
            ("ram", &["8gb", "16gb", "32gb", "64gb"]),
            ("storage", &["256gb", "512gb", "1tb", "2tb"]),
        ],
    },
    Category {
        slug: "phones",
        nouns: &["Smartphone", "Phone", "Mini Phone", "Pro Phone"],
        price: (99990, 899990),
        attributes: &[
            ("color", &["black", "white", "blue", "green", "purple"]),
            ("storage", &["64gb", "128gb", "256gb", "512gb"]),
        ],
    },
    Category {
        slug: "kitchen",
        nouns: &[
            "Coffee Maker",
            "Blender",
            "Kettle",
            "Toaster",
            "Chef Knife",
            "Frying Pan",
        ],
        price: (4990, 89990),
        attributes: &[
            ("color", &["black", "steel", "white", "red"]),
            (
                "material",
                &["stainless steel", "cast iron", "ceramic", "aluminium"],
            ),
        ],
    },
    Category {
        slug: "books",
        nouns: &["Novel", "Cookbook", "Guide", "Handbook", "Anthology"],
        price: (1990, 14990),
        attributes: &[
            ("format", &["hardcover", "paperback", "ebook"]),
            ("language", &["english", "portuguese", "spanish"]),
        ],
    },
    Category {
        slug: "toys",
        nouns: &[
            "Building Set",
            "Puzzle",
            "Board Game",
            "Plush Bear",
            "Race Car",
        ],
        price: (2990, 59990),
        attributes: &[("age", &["3+", "6+", "8+", "12+"]), ("color", COLORS)],
    },
];

const BRANDS: &[&str] = &[
    "Northwind",
    "Acme",
    "Techcorp Basics",
    "Bluepeak",
    "Urban Thread",
    "Solstice",
    "Ironwood",
    "Lumen",
    "Kestrel",
    "Maple & Co",
    "Voltline",
    "Harbor",
    "Quartz",
    "Nimbus",
    "Redwood",
    "Atlas",
    "Fjord",
    "Cobalt",
    "Juniper",
    "Orbit",
];
const ADJECTIVES: &[&str] = &[
    "Classic",
    "Essential",
    "Premium",
    "Lightweight",
    "Vintage",
    "Modern",
    "Everyday",
    "Performance",
    "Organic",
    "Compact",
    "Deluxe",
    "Rugged",
    "Slim",
    "Ultra",
    "Signature",
    "Heritage",
    "Pro",
    "Active",
    "Soft",
    "Wireless",
];
const OPENERS: &[&str] = &[
    "Designed for everyday comfort,",
    "Built to last,",
    "A customer favourite,",
    "Made with care,",
    "Engineered for performance,",
    "Inspired by timeless style,",
    "Crafted from quality materials,",
    "Lightweight and versatile,",
];
const CLOSERS: &[&str] = &[
    "Easy to care for and made to be used.",
    "Backed by a two-year warranty.",
    "Ships in recyclable packaging.",
    "Pairs well with the rest of the collection.",
    "Tested by our team before it reaches you.",
    "A smart choice for gifting.",
];

/// xorshift64*: small, fast and deterministic; not for anything secret.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.below(v.len())]
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Product number `i` of the catalog generated from `seed`.
pub fn product(seed: u64, i: u64) -> NewProduct {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ i.wrapping_add(1).wrapping_mul(0xbf58_476d_1ce4_e5b9)
        | 1);
    for _ in 0..3 {
        r.next();
    }
    let cat = &CATEGORIES[r.below(CATEGORIES.len())];
    let brand = r.pick(BRANDS);
    let noun = r.pick(cat.nouns);
    let adjective = r.pick(ADJECTIVES);
    let mut attributes = Attributes::new();
    for (name, values) in cat.attributes {
        let k = 1 + r.below(values.len().min(4));
        let mut chosen: Vec<String> = Vec::new();
        while chosen.len() < k {
            let v = r.pick(values).to_owned();
            if !chosen.contains(&v) {
                chosen.push(v);
            }
        }
        attributes.insert((*name).to_owned(), chosen);
    }
    let feature = attributes
        .values()
        .next()
        .and_then(|v| v.first())
        .cloned()
        .unwrap_or_default();
    let (lo, hi) = cat.price;
    // Prices end in 90, like shelf prices.
    let price = ((lo + (r.unit() * (hi - lo) as f64) as i64) / 100) * 100 + 90;
    let original = (r.below(4) == 0)
        .then(|| price + ((price as f64 * (0.1 + r.unit() * 0.4)) as i64 / 100) * 100);
    let currency = Currency::parse("BRL").expect("known code");
    NewProduct {
        sku: format!(
            "{}-{:07}",
            cat.slug
                .chars()
                .filter(|c| c.is_ascii_alphabetic())
                .take(3)
                .collect::<String>()
                .to_uppercase(),
            i
        ),
        title: format!("{brand} {adjective} {noun}"),
        description: format!(
            "{} the {brand} {adjective} {noun} comes in {feature} and more. {}",
            r.pick(OPENERS),
            r.pick(CLOSERS)
        ),
        price: Money {
            amount: price,
            currency,
        },
        original_price: original.map(|amount| Money { amount, currency }),
        category: cat.slug.to_owned(),
        brand: brand.to_owned(),
        attributes,
        in_stock: r.below(10) != 0,
        popularity_score: (r.unit() * 1000.0).round() / 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_is_deterministic_varied_and_valid() {
        assert_eq!(
            format!("{:?}", product(7, 3)),
            format!("{:?}", product(7, 3))
        );
        assert_ne!(product(7, 3).title, product(8, 3).title);
        let all: Vec<NewProduct> = (0..2000).map(|i| product(42, i)).collect();
        let mut cats: Vec<&str> = all.iter().map(|p| p.category.as_str()).collect();
        cats.sort();
        cats.dedup();
        assert_eq!(cats.len(), CATEGORIES.len(), "every category used");
        let skus: std::collections::HashSet<&str> = all.iter().map(|p| p.sku.as_str()).collect();
        assert_eq!(skus.len(), all.len(), "SKUs are unique");
        for p in &all {
            crate::validate(p).unwrap_or_else(|e| panic!("{p:?}: {:?}", e.0));
            assert!(p.price.amount % 100 == 90);
        }
        assert!(all.iter().filter(|p| p.original_price.is_some()).count() > 300);
        assert!(all.iter().filter(|p| !p.in_stock).count() > 100);
    }
}
