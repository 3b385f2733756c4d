//! The PostgreSQL backend's client side: the `--backend postgres://...` URL (always
//! built, so that the command line is the same in every build and refuses a backend
//! the build lacks), and with the cargo feature `postgres` the session
//! (tokio-postgres, `conn`), TLS (`tls`), the password (`password`), the statements
//! (`sql`) and the lease keeper (`keeper`). `backend/pg` puts them behind the seam.

mod url;

#[cfg(feature = "postgres")]
mod conn;
#[cfg(feature = "postgres")]
mod keeper;
#[cfg(feature = "postgres")]
mod password;
#[cfg(feature = "postgres")]
mod sql;
#[cfg(feature = "postgres")]
mod tls;

pub use url::{PgSchema, PgUrl, is_postgres};

#[cfg(feature = "postgres")]
pub use conn::{Conn, PgError, Settings};
#[cfg(feature = "postgres")]
pub use keeper::{Keeper, Lease, Op};
#[cfg(feature = "postgres")]
pub use password::find as find_password;
#[cfg(feature = "postgres")]
pub use sql::{Sql, VERSION};
#[cfg(feature = "postgres")]
pub use tls::config as tls_config;
#[cfg(feature = "postgres")]
pub use url::Host;
