//! The JSON VM description after a stream's EOF (QEMU's `vmdesc`): what lets a reader
//! (QEMU's `analyze-migration.py`, our dump) walk a device it does not know.

use serde::{Deserialize, Serialize};

/// QEMU's field type names, as they appear in the JSON description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// `bool`: one byte, 0 or 1.
    Bool,
    /// `uint8`
    U8,
    /// `uint16`
    U16,
    /// `uint32`
    U32,
    /// `uint64`
    U64,
    /// `int8`
    I8,
    /// `int16`
    I16,
    /// `int32`
    I32,
    /// `int64`
    I64,
    /// `buffer`: raw bytes.
    Buffer,
    /// `struct`: a nested description.
    Struct,
}

impl FieldType {
    /// QEMU's name of the type.
    pub fn qemu_name(self) -> &'static str {
        match self {
            FieldType::Bool => "bool",
            FieldType::U8 => "uint8",
            FieldType::U16 => "uint16",
            FieldType::U32 => "uint32",
            FieldType::U64 => "uint64",
            FieldType::I8 => "int8",
            FieldType::I16 => "int16",
            FieldType::I32 => "int32",
            FieldType::I64 => "int64",
            FieldType::Buffer => "buffer",
            FieldType::Struct => "struct",
        }
    }
}

/// One field of a description: `{"name": …, "type": …, "size": …}`, as QEMU's
/// `vmsd_desc_field_start`/`_end` write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldDesc {
    /// The field's name.
    pub name: String,
    /// The repeat count of a compressed array: this one entry stands for `array_len`
    /// elements of the same layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array_len: Option<u64>,
    /// The element of an array whose elements are described one by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    /// QEMU's type name, e.g. `uint32`, `buffer`, `struct`.
    #[serde(rename = "type")]
    pub ty: String,
    /// The layout of a `struct` field.
    #[serde(rename = "struct", default, skip_serializing_if = "Option::is_none")]
    pub nested: Option<Box<StructDesc>>,
    /// Bytes the field (one element of an array) takes in the stream.
    pub size: u64,
}

/// A described struct: a `struct` field's layout, or a subsection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StructDesc {
    /// The VMState description's name (for a subsection, its name in the stream).
    #[serde(default)]
    pub vmsd_name: String,
    /// The version it was written at.
    #[serde(default)]
    pub version: u32,
    /// The fields in stream order.
    #[serde(default)]
    pub fields: Vec<FieldDesc>,
    /// Subsections after the fields, those that were written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsections: Vec<StructDesc>,
}

/// One device of the VM description: its section, and its described state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDescription {
    /// The section idstr.
    #[serde(default)]
    pub name: String,
    /// The section instance.
    #[serde(default)]
    pub instance_id: u32,
    /// The state: vmsd name, version (the section's), fields and subsections, written
    /// inline as QEMU does.
    #[serde(flatten)]
    pub state: StructDesc,
}

/// The JSON trailer after EOF: `{"page_size": 4096, "devices": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// The target page size of the RAM section.
    pub page_size: u64,
    /// Every FULL section, in stream order.
    pub devices: Vec<DeviceDescription>,
}

impl VmDescription {
    /// The device whose section is `idstr` / `instance_id`.
    pub fn device(&self, idstr: &str, instance_id: u32) -> Option<&DeviceDescription> {
        self.devices
            .iter()
            .find(|d| d.name == idstr && d.instance_id == instance_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_json_matches_qemus_shape() {
        let d = VmDescription {
            page_size: 4096,
            devices: vec![DeviceDescription {
                name: "serial".into(),
                instance_id: 0,
                state: StructDesc {
                    vmsd_name: "serial".into(),
                    version: 1,
                    fields: vec![
                        FieldDesc {
                            name: "lcr".into(),
                            array_len: None,
                            index: None,
                            ty: "uint8".into(),
                            nested: None,
                            size: 1,
                        },
                        FieldDesc {
                            name: "regs".into(),
                            array_len: Some(4),
                            index: None,
                            ty: "uint32".into(),
                            nested: None,
                            size: 4,
                        },
                    ],
                    subsections: vec![StructDesc {
                        vmsd_name: "serial/fifo".into(),
                        version: 1,
                        fields: vec![],
                        subsections: vec![],
                    }],
                },
            }],
        };
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(
            json,
            r#"{"page_size":4096,"devices":[{"name":"serial","instance_id":0,"vmsd_name":"serial","version":1,"fields":[{"name":"lcr","type":"uint8","size":1},{"name":"regs","array_len":4,"type":"uint32","size":4}],"subsections":[{"vmsd_name":"serial/fifo","version":1,"fields":[]}]}]}"#
        );
        assert_eq!(serde_json::from_str::<VmDescription>(&json).unwrap(), d);
    }
}
