//! Seeded JSON shapes for the Lua boundary, the shapes a fuzz campaign of the
//! request path sends: deep and wide objects and arrays, mixed nesting, awkward
//! strings and numbers. The same seed gives the same shapes, so a failure names
//! a shape that can be sent again.
#![allow(dead_code)]

/// xorshift64*: small, seedable, good enough to pick shapes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `depth` nested objects (`{"a":...}`) or arrays around `1`.
pub fn nested(depth: usize, object: bool) -> String {
    let (open, close) = if object { (r#"{"a":"#, "}") } else { ("[", "]") };
    format!("{}1{}", open.repeat(depth), close.repeat(depth))
}

/// Objects and arrays alternating, `depth` levels.
pub fn mixed(depth: usize) -> String {
    let mut text = String::from("\"leaf\"");
    for level in 0..depth {
        text = if level % 2 == 0 { format!("[0,{text}]") } else { format!(r#"{{"k{level}":{text},"n":null}}"#) };
    }
    text
}

/// The named shapes: every depth from 1 to 300 (objects, arrays, mixed), wide
/// containers, and `random` generated value trees.
pub fn shapes(seed: u64, random: usize) -> Vec<(String, String)> {
    let mut shapes = Vec::new();
    for depth in (1..=64).chain((65..=300).step_by(7)) {
        shapes.push((format!("object depth {depth}"), nested(depth, true)));
        shapes.push((format!("array depth {depth}"), nested(depth, false)));
        shapes.push((format!("mixed depth {depth}"), mixed(depth)));
    }
    let wide_object: Vec<String> = (0..5000).map(|i| format!(r#""key{i}":{i}"#)).collect();
    shapes.push(("object of 5000 keys".into(), format!("{{{}}}", wide_object.join(","))));
    let wide_array: Vec<String> = (0..20000).map(|i| format!("[{i},\"{i}\"]")).collect();
    shapes.push(("array of 20000 pairs".into(), format!("[{}]", wide_array.join(","))));
    let mut rng = Rng::new(seed);
    for index in 0..random {
        let mut text = String::new();
        let mut budget = 2000;
        value(&mut rng, &mut text, 0, &mut budget);
        shapes.push((format!("random value {index} of seed {seed}"), text));
    }
    shapes
}

/// Writes a random value of at most `budget` nodes more.
fn value(rng: &mut Rng, out: &mut String, depth: usize, budget: &mut usize) {
    *budget = budget.saturating_sub(1);
    let leaf = depth >= 12 || *budget == 0 || rng.below(3) == 0;
    match if leaf { rng.below(6) } else { 6 + rng.below(2) } {
        0 => out.push_str(["null", "true", "false"][rng.below(3) as usize]),
        1 => out.push_str(&integer(rng).to_string()),
        2 | 3 => out.push_str(&float(rng)),
        4 | 5 => string(rng, out),
        6 => {
            out.push('[');
            for item in 0..rng.below(8) {
                if item > 0 {
                    out.push(',');
                }
                value(rng, out, depth + 1, budget);
            }
            out.push(']');
        }
        _ => {
            out.push('{');
            for item in 0..rng.below(8) {
                if item > 0 {
                    out.push(',');
                }
                out.push_str(&format!("\"k{item}_"));
                out.push_str(&rng.below(1000).to_string());
                out.push_str("\":");
                value(rng, out, depth + 1, budget);
            }
            out.push('}');
        }
    }
}

fn integer(rng: &mut Rng) -> i64 {
    match rng.below(4) {
        0 => i64::MIN + rng.below(3) as i64,
        1 => i64::MAX - rng.below(3) as i64,
        _ => rng.next() as i64 >> rng.below(63),
    }
}

/// A finite float written as Rust writes it (shortest text that reads back the
/// same), from random bits: subnormals, huge and tiny exponents included.
fn float(rng: &mut Rng) -> String {
    loop {
        let number = match rng.below(3) {
            0 => f64::from_bits(rng.next()),
            1 => f64::from_bits(rng.below(1 << 20)),
            _ => (rng.next() >> 11) as f64 / (1u64 << rng.below(53)) as f64,
        };
        if number.is_finite() {
            let text = format!("{number:?}");
            return if text.contains(['.', 'e']) { text } else { format!("{text}.0") };
        }
    }
}

fn string(rng: &mut Rng, out: &mut String) {
    const PIECES: &[&str] = &[
        "a",
        "Z",
        " ",
        "\\\"",
        "\\\\",
        "\\n",
        "\\r",
        "\\t",
        "\\u0000",
        "\\u001f",
        "é",
        "\\u00e9",
        "😀",
        "\\ud83d\\ude00",
        "/",
        "\\/",
        "\\b\\f",
    ];
    out.push('"');
    for _ in 0..rng.below(24) {
        out.push_str(PIECES[rng.below(PIECES.len() as u64) as usize]);
    }
    out.push('"');
}
