fn main() {
    println!("uplink {}", env!("CARGO_PKG_VERSION"));
}
