// The migrations are embedded by `sqlx::migrate!`, which does not tell cargo to rebuild when
// a migration is added or changed.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
