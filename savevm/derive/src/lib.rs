//! `#[derive(VmState)]`: a struct's fields declared once as QEMU vmstate fields, for
//! `savevm::VmState` (writing, reading and the JSON description) and `savevm::VmField`
//! (the struct as a `struct` field of another).
//!
//! On the struct: `#[vmstate(name = "serial", version = 2, minimum_version = 1)]`
//! (name defaults to the struct's name, version to 1, minimum_version to version).
//!
//! On a field:
//! - `#[vmstate(version = N)]`: present from version N on (QEMU's `_V` fields);
//! - `#[vmstate(exists = path)]`: present when `path(&self, version) -> bool` says
//!   (QEMU's `field_exists`), asked on save and on load, where `self` holds the fields
//!   read so far;
//! - `#[vmstate(subsection)]` on an `Option<T>` (`T: VmState + Default`): a subsection
//!   named `<name>/<field>`, written when `Some`, `None` when a stream lacks it;
//! - `#[vmstate(max_len = N)]` (any `usize` expression): no `Vec` in the field longer
//!   than N, refused on save
//!   and on load alike;
//! - `#[vmstate(rename = "…")]`: the field's name in the stream's description;
//! - `#[vmstate(skip)]`: not migrated (loading leaves it as it was).
//!
//! The savevm crate documents and tests the result (`savevm::VmState`).

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, GenericArgument, LitInt, LitStr, PathArguments, Type};

/// Derives `savevm::VmState` and `savevm::VmField`; see the crate documentation.
#[proc_macro_derive(VmState, attributes(vmstate))]
pub fn derive_vmstate(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// The struct's attribute.
struct Container {
    name: String,
    version: u32,
    minimum_version: u32,
}

/// What a field's attribute says.
#[derive(Default)]
struct FieldAttrs {
    skip: bool,
    subsection: bool,
    version: Option<(u32, proc_macro2::Span)>,
    exists: Option<syn::Path>,
    rename: Option<String>,
    max_len: Option<syn::Expr>,
}

fn container(input: &DeriveInput) -> syn::Result<Container> {
    let mut c = Container {
        name: input.ident.to_string(),
        version: 1,
        minimum_version: 0,
    };
    let mut minimum = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("vmstate")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                c.name = meta.value()?.parse::<LitStr>()?.value();
            } else if meta.path.is_ident("version") {
                c.version = meta.value()?.parse::<LitInt>()?.base10_parse()?;
            } else if meta.path.is_ident("minimum_version") {
                minimum = Some(meta.value()?.parse::<LitInt>()?.base10_parse()?);
            } else {
                return Err(meta.error("expected name, version or minimum_version"));
            }
            Ok(())
        })?;
    }
    c.minimum_version = minimum.unwrap_or(c.version);
    if c.minimum_version > c.version || c.version == 0 {
        return Err(syn::Error::new(
            input.ident.span(),
            "vmstate: need 1 <= minimum_version <= version",
        ));
    }
    if c.name.is_empty() || c.name.len() > 255 {
        return Err(syn::Error::new(
            input.ident.span(),
            "vmstate: a name of 1 to 255 bytes",
        ));
    }
    Ok(c)
}

fn field_attrs(field: &syn::Field) -> syn::Result<FieldAttrs> {
    let mut a = FieldAttrs::default();
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("vmstate")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("skip") {
                a.skip = true;
            } else if meta.path.is_ident("subsection") {
                a.subsection = true;
            } else if meta.path.is_ident("version") {
                let lit = meta.value()?.parse::<LitInt>()?;
                a.version = Some((lit.base10_parse()?, lit.span()));
            } else if meta.path.is_ident("exists") {
                a.exists = Some(meta.value()?.parse::<syn::Path>()?);
            } else if meta.path.is_ident("rename") {
                a.rename = Some(meta.value()?.parse::<LitStr>()?.value());
            } else if meta.path.is_ident("max_len") {
                a.max_len = Some(meta.value()?.parse::<syn::Expr>()?);
            } else {
                return Err(meta.error(
                    "expected skip, subsection, version = N, exists = path, max_len = N or rename = \"…\"",
                ));
            }
            Ok(())
        })?;
    }
    Ok(a)
}

/// `T` of `Option<T>`.
fn option_inner(ty: &Type) -> Option<&Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Option" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    }
}

fn expand(input: &DeriveInput) -> syn::Result<Tokens> {
    let c = container(input)?;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new(
            input.ident.span(),
            "VmState derives for structs with named fields",
        ));
    };
    let Fields::Named(named) = &data.fields else {
        return Err(syn::Error::new(
            input.ident.span(),
            "VmState derives for structs with named fields",
        ));
    };

    let mut save = Vec::new();
    let mut load = Vec::new();
    let mut same_layout = Vec::new();
    let mut subsections = Vec::new();
    for field in &named.named {
        let a = field_attrs(field)?;
        let ident = field.ident.as_ref().expect("named");
        let name = a.rename.clone().unwrap_or_else(|| ident.to_string());
        if a.skip {
            continue;
        }
        if a.subsection {
            let Some(inner) = option_inner(&field.ty) else {
                return Err(syn::Error::new(
                    field.ty.span(),
                    "a subsection is an Option<T> with T: VmState + Default",
                ));
            };
            if a.version.is_some() || a.exists.is_some() {
                return Err(syn::Error::new(
                    field.span(),
                    "a subsection is present when Some: no version or exists",
                ));
            }
            subsections.push((ident.clone(), name, inner.clone()));
            continue;
        }
        let ty = &field.ty;
        same_layout.push(quote_spanned! {ty.span()=> <#ty as ::savevm::VmField>::SAME_LAYOUT });
        let (put, get) = match a.max_len {
            None => (
                quote_spanned! {ty.span()=>
                    ::savevm::VmField::save_field(&self.#ident, #name, w);
                },
                quote_spanned! {ty.span()=>
                    ::savevm::VmField::load_field(&mut self.#ident, #name, r)?;
                },
            ),
            Some(ref n) => (
                quote_spanned! {ty.span()=>
                    w.with_max_elements(#n, |w| ::savevm::VmField::save_field(&self.#ident, #name, w));
                },
                quote_spanned! {ty.span()=>
                    r.with_max_elements(#n, |r| ::savevm::VmField::load_field(&mut self.#ident, #name, r))?;
                },
            ),
        };
        match (&a.version, &a.exists) {
            (Some(_), Some(_)) => {
                return Err(syn::Error::new(
                    field.span(),
                    "version and exists together: exists alone decides, as in QEMU",
                ));
            }
            (Some((v, span)), None) => {
                if *v > c.version || *v == 0 {
                    return Err(syn::Error::new(
                        *span,
                        format!("a field version from 1 to the struct's {}", c.version),
                    ));
                }
                save.push(put);
                load.push(quote! { if #v <= version { #get } });
            }
            (None, Some(path)) => {
                same_layout.push(quote! { false });
                save.push(quote! {
                    if #path(self, <Self as ::savevm::VmState>::VERSION) { #put }
                });
                load.push(quote! { if #path(self, version) { #get } });
            }
            (None, None) => {
                save.push(put);
                load.push(get);
            }
        }
    }
    if !subsections.is_empty() {
        same_layout.push(quote! { false });
    }

    let save_subs = subsections.iter().map(|(ident, name, inner)| {
        quote! {
            if let ::core::option::Option::Some(sub) = &self.#ident {
                let name = ::std::format!("{}/{}", <Self as ::savevm::VmState>::NAME, #name);
                w.subsection(&name, <#inner as ::savevm::VmState>::VERSION, |w| {
                    ::savevm::VmState::save_state(sub, w)
                });
            }
        }
    });
    let clear_subs = subsections.iter().map(|(ident, _, _)| {
        quote! { self.#ident = ::core::option::Option::None; }
    });
    let load_subs = subsections.iter().map(|(ident, name, inner)| {
        quote! {
            if found == ::std::format!("{}/{}", <Self as ::savevm::VmState>::NAME, #name) {
                ::savevm::check_version(
                    &found,
                    found_version,
                    <#inner as ::savevm::VmState>::MINIMUM_VERSION,
                    <#inner as ::savevm::VmState>::VERSION,
                )?;
                let mut sub = <#inner as ::core::default::Default>::default();
                ::savevm::VmState::load_state(&mut sub, r, found_version)?;
                self.#ident = ::core::option::Option::Some(sub);
                continue;
            }
        }
    });

    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let (name, version, minimum) = (&c.name, c.version, c.minimum_version);
    let load_version_unused = quote! { let _ = version; };
    Ok(quote! {
        impl #impl_generics ::savevm::VmState for #ident #ty_generics #where_clause {
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;
            const MINIMUM_VERSION: u32 = #minimum;
            const SAME_LAYOUT: bool = true #(&& #same_layout)*;

            fn save_state(&self, w: &mut ::savevm::FieldWriter<'_>) {
                #(#save)*
                #(#save_subs)*
            }

            fn load_state(
                &mut self,
                r: &mut ::savevm::FieldReader<'_>,
                version: u32,
            ) -> ::core::result::Result<(), ::savevm::FieldError> {
                #load_version_unused
                #(#load)*
                #(#clear_subs)*
                while let ::core::option::Option::Some((found, found_version)) =
                    r.subsection(<Self as ::savevm::VmState>::NAME)?
                {
                    #(#load_subs)*
                    let _ = found_version;
                    return ::core::result::Result::Err(::savevm::FieldError::invalid(
                        &found,
                        "a subsection this side does not know",
                    ));
                }
                ::core::result::Result::Ok(())
            }
        }

        impl #impl_generics ::savevm::VmField for #ident #ty_generics #where_clause {
            const SAME_LAYOUT: bool = <Self as ::savevm::VmState>::SAME_LAYOUT;

            fn save_field(&self, name: &str, w: &mut ::savevm::FieldWriter<'_>) {
                w.structure(
                    name,
                    <Self as ::savevm::VmState>::NAME,
                    <Self as ::savevm::VmState>::VERSION,
                    |w| ::savevm::VmState::save_state(self, w),
                );
            }

            fn load_field(
                &mut self,
                _name: &str,
                r: &mut ::savevm::FieldReader<'_>,
            ) -> ::core::result::Result<(), ::savevm::FieldError> {
                // A nested struct loads at its own version, as QEMU's VMS_STRUCT.
                ::savevm::VmState::load_state(self, r, <Self as ::savevm::VmState>::VERSION)
            }
        }
    })
}
