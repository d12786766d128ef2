//! A valid component of another world. It exists so tests can prove the
//! host refuses components that do not implement the handler world.

wit_bindgen::generate!({
    inline: "package test:other; world other { export run: func() -> u32; }",
});

struct Other;

impl Guest for Other {
    fn run() -> u32 {
        42
    }
}

export!(Other);
