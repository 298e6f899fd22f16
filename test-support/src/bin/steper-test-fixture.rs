//! Makes the tiny test fixture (if it is not there) and prints its folder: the test command
//! runs the embedding example on it.

fn main() -> anyhow::Result<()> {
    let t = steper_test_support::tiny()?;
    println!("{}", t.dir.display());
    Ok(())
}
